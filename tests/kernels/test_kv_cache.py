"""store_kv, copy_blocks and gather_kv on both backends, against the references and against direct indexing."""
import pytest
import torch

from arpo_kernels._backend import backend_for
from arpo_kernels.kv_cache import copy_blocks, copy_blocks_reference, gather_kv, store_kv, store_kv_reference

DTYPES = [torch.float32, torch.bfloat16]


def _cache(num_blocks, block_size, hkv, d, dtype, device):
    return (torch.randn(num_blocks, block_size, hkv, d, device=device).to(dtype),
            torch.randn(num_blocks, block_size, hkv, d, device=device).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,hkv,d,slot_dtype", [(1, 2, 64, torch.int64), (16, 3, 80, torch.int32),
                                                         (32, 1, 128, torch.int64)])
def test_store_kv(backend, device, dtype, block_size, hkv, d, slot_dtype):
    k_cache, v_cache = _cache(5, block_size, hkv, d, dtype, device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    num_slots = 5 * block_size
    t = min(9, num_slots)
    slots = torch.randperm(num_slots, device=device)[:t].to(slot_dtype)
    slots[1] = -1  # padding rows are skipped
    slots[t // 2] = -7
    # k and v as views into a fused qkv projection: rows are strided, heads are not.
    qkv = torch.randn(t, 4 * hkv, d, device=device).to(dtype)
    k, v = qkv[:, 2 * hkv:3 * hkv], qkv[:, 3 * hkv:]
    assert not k.is_contiguous()
    assert backend_for(k_cache) == backend
    store_kv(k, v, k_cache, v_cache, slots)

    keep = slots >= 0
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[slots[keep].long()], k[keep])
    assert torch.equal(flat_v[slots[keep].long()], v[keep])
    untouched = torch.ones(num_slots, dtype=torch.bool, device=device)
    untouched[slots[keep].long()] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, hkv, d)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, hkv, d)[untouched])

    ref_k, ref_v = before_k.clone(), before_v.clone()
    store_kv_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(ref_k, k_cache) and torch.equal(ref_v, v_cache)


def test_store_then_gather_roundtrip(backend, device):
    block_size, hkv, d, length = 4, 2, 64, 11
    k_cache, v_cache = _cache(8, block_size, hkv, d, torch.float32, device)
    table = torch.tensor([6, 1, 3, 0], dtype=torch.int32, device=device)  # scattered blocks
    pos = torch.arange(length, device=device)
    slots = table.long()[pos // block_size] * block_size + pos % block_size
    k = torch.randn(length, hkv, d, device=device)
    v = torch.randn(length, hkv, d, device=device)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(gather_kv(k_cache, table, length), k)
    assert torch.equal(gather_kv(v_cache, table, length), v)


def test_store_kv_empty(backend, device):
    k_cache, v_cache = _cache(2, 4, 1, 64, torch.float32, device)
    before = k_cache.clone()
    empty = torch.empty(0, 1, 64, device=device)
    store_kv(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(k_cache, before)


def test_store_kv_errors(device):
    k_cache, v_cache = _cache(2, 4, 2, 64, torch.float32, device)
    k = torch.randn(3, 2, 64, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="dtype"):
        store_kv(k.bfloat16(), k.bfloat16(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match=r"\[T, 2, 64\]"):
        store_kv(k[:, :1], k[:, :1], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="int32 or int64"):
        store_kv(k, k, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="entries for 3 rows"):
        store_kv(k, k, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="contiguous"):
        store_kv(k, k, k_cache.transpose(0, 1), v_cache.transpose(0, 1), slots)
    with pytest.raises(ValueError, match="must match"):
        store_kv(k, k, k_cache, v_cache[:1], slots)
    if device == "cpu":
        with pytest.raises(ValueError, match="slot 8"):
            store_kv(k, k, k_cache, v_cache, torch.tensor([0, 8, 1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_copy_blocks(backend, device, dtype, index_dtype):
    caches = [torch.randn(7, 16, 2, 80, device=device).to(dtype) for _ in range(4)]  # 2 layers x (k, v)
    before = [c.clone() for c in caches]
    src = torch.tensor([0, 9, 2, 9, 2, 9, 5], dtype=index_dtype, device=device)[::2]  # strided view
    assert src.tolist() == [0, 2, 2, 5]  # one parent block may feed several children
    dst = torch.tensor([1, 3, 6, 4], dtype=index_dtype, device=device)
    copy_blocks(caches, src, dst)
    for c, b in zip(caches, before):
        assert torch.equal(c[dst.long()], b[src.long()])
        untouched = [i for i in range(7) if i not in dst.tolist()]
        assert torch.equal(c[untouched], b[untouched])
    ref = [b.clone() for b in before]
    copy_blocks_reference(ref, src, dst)
    assert all(torch.equal(a, b) for a, b in zip(caches, ref))
    empty = torch.empty(0, dtype=index_dtype, device=device)
    copy_blocks(caches, empty, empty)  # nothing to copy is fine


def test_copy_blocks_errors(device):
    caches = [torch.randn(4, 2, 1, 64, device=device) for _ in range(2)]
    src = torch.tensor([0], device=device)
    dst = torch.tensor([1], device=device)
    with pytest.raises(ValueError, match="at least one"):
        copy_blocks([], src, dst)
    with pytest.raises(ValueError, match=r"caches\[1\]"):
        copy_blocks([caches[0], caches[1][:3]], src, dst)
    with pytest.raises(ValueError, match=r"caches\[1\]"):
        copy_blocks([caches[0], caches[1].bfloat16()], src, dst)
    with pytest.raises(ValueError, match="blocks but dst"):
        copy_blocks(caches, src, torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="int32 or int64"):
        copy_blocks(caches, src.float(), dst)
    if device == "cpu":
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            copy_blocks(caches, src, torch.tensor([4]))
