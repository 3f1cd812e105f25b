"""Writing into and copying blocks of the paged KV cache.

Why: the engine keeps every layer's K and V in a pool of fixed-size blocks, `[num_blocks, block_size,
num_kv_heads, head_dim]` (contiguous), and a sequence's tokens live wherever its block table points. Slot
`s = block_id * block_size + offset` names one token row. Two small kernels maintain the pool:

- `store_kv` scatters the K/V rows a forward pass just produced into their slots (slot < 0: padding, skipped);
- `copy_blocks` performs the copy-on-write copies a fork asks for: block `src[i]` -> block `dst[i]` in every
  layer's K and V cache in one launch (the cache base pointers travel as an int64 tensor).

`gather_kv` reads a sequence back into contiguous `[len, num_kv_heads, head_dim]`; the attention references and
the tests use it. Inference only: nothing here is differentiable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from arpo_kernels._backend import use_triton

_CACHE_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_INDEX_DTYPES = (torch.int32, torch.int64)
_COPY_CHUNK = 1024  # elements one copy program moves


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, num_slots,
    H: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):  # padding rows (out of range is rejected on the host where it can be)
        return
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = slot * (H * D) + offs_h[:, None] * D + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _copy_blocks_kernel(cache_ptrs, src_ptr, dst_ptr, block_numel, DTYPE: tl.constexpr, CHUNK: tl.constexpr):
    cache = tl.load(cache_ptrs + tl.program_id(0)).to(tl.pointer_type(DTYPE))
    pair = tl.program_id(1)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    offs = tl.program_id(2).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    x = tl.load(cache + src * block_numel + offs, mask=mask)
    tl.store(cache + dst * block_numel + offs, x, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Checks shared with the attention kernels.
# ----------------------------------------------------------------------------------------------------------------
def check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(cache.shape)}")
    if cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"{name} dtype {cache.dtype} is not supported; use float32, bfloat16 or float16")
    if not cache.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_index(name: str, index: torch.Tensor, dim: int, device: torch.device) -> None:
    if index.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {index.dtype}")
    if index.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the cache is on {device}")


def _check_store(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)}/{k_cache.dtype} and v_cache "
                         f"{tuple(v_cache.shape)}/{v_cache.dtype} must match")
    row = tuple(k_cache.shape[2:])
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or tuple(x.shape[1:]) != row:
            raise ValueError(f"{name} must be [T, {row[0]}, {row[1]}] to match the cache, got {tuple(x.shape)}")
        if x.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from the cache dtype {k_cache.dtype}")
        if x.device != k_cache.device:
            raise ValueError(f"{name} is on {x.device} but the cache is on {k_cache.device}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} rows but v has {v.shape[0]}")
    check_index("slot_mapping", slot_mapping, 1, k_cache.device)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} rows")
    if slot_mapping.device.type == "cpu" and slot_mapping.numel():  # free to check here; on a GPU it would sync
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        if int(slot_mapping.max()) >= num_slots:
            raise ValueError(f"slot_mapping holds slot {int(slot_mapping.max())} but the cache has {num_slots}")


# ----------------------------------------------------------------------------------------------------------------
# store_kv
# ----------------------------------------------------------------------------------------------------------------
def _store_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.shape[0] == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _, block_size, h, d = k_cache.shape
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.shape[0] * block_size,
        H=h, D=d, H_PAD=triton.next_power_of_2(h), D_PAD=triton.next_power_of_2(d),
    )


def store_kv_reference(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Plain PyTorch: k_cache[slot] = k[t] for every row t whose slot is >= 0 (in place)."""
    h, d = k_cache.shape[2:]
    slots = slot_mapping.long()
    if bool((slots < 0).any()):  # padded rows: written nowhere
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(-1, h, d).index_copy_(0, slots, k)
    v_cache.view(-1, h, d).index_copy_(0, slots, v)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, validate: bool = True) -> None:
    """Write `k`, `v` `[T, num_kv_heads, head_dim]` into cache slots `slot_mapping` `[T]` (slot < 0: skip).

    `validate=False` skips the checks: for a caller that validated the batch once for all layers (the model does,
    in `AttentionContext.check`)."""
    if validate:
        _check_store(k, v, k_cache, v_cache, slot_mapping)
    (_store_kv_triton if use_triton(k_cache) else store_kv_reference)(k, v, k_cache, v_cache, slot_mapping)


# ----------------------------------------------------------------------------------------------------------------
# copy_blocks
# ----------------------------------------------------------------------------------------------------------------
_PTR_TABLES: dict[tuple, torch.Tensor] = {}  # base pointers of a cache list, built once per list


def _check_copy(caches, src, dst) -> None:
    if not caches:
        raise ValueError("copy_blocks needs at least one cache tensor")
    first = caches[0]
    for i, c in enumerate(caches):
        check_cache(f"caches[{i}]", c)
        if c.shape != first.shape or c.dtype != first.dtype or c.device != first.device:
            raise ValueError(f"caches[{i}] is {tuple(c.shape)}/{c.dtype}/{c.device}, expected "
                             f"{tuple(first.shape)}/{first.dtype}/{first.device} like caches[0]")
    check_index("src", src, 1, first.device)
    check_index("dst", dst, 1, first.device)
    if src.shape != dst.shape:
        raise ValueError(f"src has {src.numel()} blocks but dst has {dst.numel()}")
    if src.device.type == "cpu" and src.numel():
        lo, hi = int(torch.minimum(src.min(), dst.min())), int(torch.maximum(src.max(), dst.max()))
        if lo < 0 or hi >= first.shape[0]:
            raise ValueError(f"block ids must lie in [0, {first.shape[0]}), got range [{lo}, {hi}]")


def _copy_blocks_triton(caches, src, dst) -> None:
    if src.numel() == 0:
        return
    ptr_list = [c.data_ptr() for c in caches]
    key = (str(caches[0].device), *ptr_list)
    ptrs = _PTR_TABLES.get(key)
    if ptrs is None:
        if len(_PTR_TABLES) > 64:
            _PTR_TABLES.clear()
        ptrs = _PTR_TABLES[key] = torch.tensor(ptr_list, dtype=torch.int64, device=caches[0].device)
    block_numel = caches[0][0].numel()
    grid = (len(caches), src.numel(), triton.cdiv(block_numel, _COPY_CHUNK))
    _copy_blocks_kernel[grid](ptrs, src.contiguous(), dst.contiguous(), block_numel,
                              DTYPE=_CACHE_DTYPES[caches[0].dtype], CHUNK=_COPY_CHUNK)


def copy_blocks_reference(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Plain PyTorch: cache[dst[i]] = cache[src[i]] for every cache (in place)."""
    src, dst = src.long(), dst.long()
    for c in caches:
        c.index_copy_(0, dst, c.index_select(0, src))


def copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy block `src[i]` to block `dst[i]` in every cache tensor (all layers' K and V). dst must not overlap src."""
    _check_copy(caches, src, dst)
    (_copy_blocks_triton if use_triton(caches[0]) else copy_blocks_reference)(caches, src, dst)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` token rows of one sequence, contiguous: `[length, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    slots = block_table.long()[pos // block_size] * block_size + pos % block_size
    return cache.view(-1, *cache.shape[2:])[slots]
