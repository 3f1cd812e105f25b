"""The engine's path: chunked prefill and decode through the paged KV cache (scattered blocks) give the same
logits as one packed forward over the full sequences, for each architecture (Qwen3's q/k norm then runs in the
fused rotary kernel). Runs the real `arpo_kernels` kernels, on the PyTorch and the Triton backend."""
import pytest
import torch
from tiny_models import make_hf_model, pack

from arpo.model import AttentionContext, CausalLM

BLOCK = 4
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEV == "cpu" else 2e-2  # fp32 tl.dot may run in TF32 on the GPU


CONFIGS = ["gqa7-untied", "gqa2-tied", "qwen2-yarn", "qwen3-bias-yarn", "llama3-gqa2", "llama-bias-headdim"]
ON_TRITON = ["gqa7-untied", "qwen3-bias-yarn", "llama-bias-headdim"]  # the interpreter takes ~15 s a config


@pytest.fixture(scope="module", params=CONFIGS)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param).save_pretrained(path)
    return CausalLM.from_pretrained(str(path), device=DEV)


def _slots(table: torch.Tensor, positions: range) -> list[int]:
    return [int(table[p // BLOCK]) * BLOCK + p % BLOCK for p in positions]


@pytest.mark.parametrize("model, backend", [(n, "torch") for n in CONFIGS] + [(n, "triton") for n in ON_TRITON],
                         indirect=True)
def test_chunked_prefill_then_decode_matches_packed_forward(model, backend):
    torch.manual_seed(0)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 9, 3)]
    first_chunk = [3, 6, 3]
    decode_steps = 3
    num_blocks = 24
    caches = model.allocate_kv_cache(num_blocks, BLOCK, dtype=torch.float32)
    assert caches[0][0].shape == (num_blocks, BLOCK, model.config.num_key_value_heads, model.config.head_dim)
    tables = torch.randperm(num_blocks)[: 3 * 5].view(3, 5).to(DEV, torch.int32)  # non-contiguous blocks
    seqs = [list(p) for p in prompts]
    done = [0, 0, 0]  # tokens already in the cache
    got: list[list[torch.Tensor]] = [[], [], []]

    def step(new: list[list[int]], is_decode: bool):
        ids, pos, slots, qlens = [], [], [], []
        for b, toks in enumerate(new):
            ids += toks
            pos += range(done[b], done[b] + len(toks))
            slots += _slots(tables[b], range(done[b], done[b] + len(toks)))
            qlens.append(len(toks))
        ctx_lens = torch.tensor([done[b] + qlens[b] for b in range(3)], dtype=torch.int32, device=DEV)
        ctx = AttentionContext.paged(
            caches,
            slot_mapping=torch.tensor(slots, device=DEV),
            block_tables=tables,
            context_lens=ctx_lens,
            cu_seqlens_q=torch.tensor([0] + qlens, device=DEV).cumsum(0).to(torch.int32),
            is_decode=is_decode,
            max_seqlen_q=max(qlens),
            max_context_len=int(ctx_lens.max()),
        )
        with torch.no_grad():
            logits = model.compute_logits(model(torch.tensor(ids, device=DEV), torch.tensor(pos, device=DEV), ctx))
        off = 0
        for b in range(3):
            got[b].append(logits[off : off + qlens[b]])
            off += qlens[b]
            done[b] += qlens[b]

    step([p[:c] for p, c in zip(prompts, first_chunk)], is_decode=False)
    step([p[c:] for p, c in zip(prompts, first_chunk)], is_decode=False)  # one sequence has nothing left
    for _ in range(decode_steps):
        new = [[int(torch.randint(0, V, ()))] for _ in range(3)]
        for b in range(3):
            seqs[b] += new[b]
        step(new, is_decode=True)

    ids, pos, cu = pack(seqs)
    with torch.no_grad():
        ref = model.compute_logits(model(ids.to(DEV), pos.to(DEV), AttentionContext.varlen(cu.to(DEV))))
    off = 0
    for b in range(3):
        ours = torch.cat(got[b])
        n = len(seqs[b])
        assert ours.shape[0] == n  # every token's logits were produced exactly once
        assert (ours - ref[off : off + n]).abs().max().item() <= TOL
        off += n


def test_paged_context_checks(model):
    caches = model.allocate_kv_cache(4, BLOCK)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        AttentionContext.paged(caches, torch.zeros(2), torch.zeros(1, 1), torch.ones(1))
    ctx = AttentionContext.paged(caches[:1], torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.int32),
                                 torch.ones(2, dtype=torch.int32), is_decode=True)
    with pytest.raises(ValueError, match="layers"):
        model(torch.tensor([1, 2], device=DEV), torch.tensor([0, 0], device=DEV), ctx)
    total_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)
    assert model.kv_cache_bytes_per_block(BLOCK) * 4 == total_bytes
