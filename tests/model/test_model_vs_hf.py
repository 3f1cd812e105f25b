"""Our forward against transformers (Qwen2, Qwen3, Llama; fp32, max |Δlogit| ≤ 1e-4), in every attention mode
the trainer uses: packed varlen causal, and the tree ancestor mask."""
import pytest
import torch

from arpo.model import AttentionContext, CausalLM
from arpo.model import attention as attention_mod

from tiny_models import hf_padded_logits, pack

TOL = 1e-4


def _ragged(vocab: int, lens=(5, 1, 12, 7), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def test_single_sequence_matches_hf(hf_checkpoint):
    hf, path = hf_checkpoint
    model = CausalLM.from_pretrained(path)
    seq = _ragged(model.config.vocab_size, lens=(13,))[0]
    ids = torch.tensor(seq)
    with torch.no_grad():
        ours = model.compute_logits(model(ids, torch.arange(len(seq))))
        theirs = hf(ids[None]).logits[0]
    assert ours.shape == (len(seq), model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= TOL


def test_packed_varlen_matches_hf_padded(hf_checkpoint):
    hf, path = hf_checkpoint
    model = CausalLM.from_pretrained(path)
    seqs = _ragged(model.config.vocab_size)
    ids, pos, cu = pack(seqs)
    with torch.no_grad():
        ours = model.compute_logits(model(ids, pos, AttentionContext.varlen(cu, max_seqlen=12)))
    theirs = torch.cat(hf_padded_logits(hf, seqs))
    assert (ours - theirs).abs().max().item() <= TOL


def test_varlen_max_seqlen_inferred_when_omitted(hf_checkpoint):
    hf, path = hf_checkpoint
    model = CausalLM.from_pretrained(path)
    seqs = _ragged(model.config.vocab_size, lens=(3, 9))
    ids, pos, cu = pack(seqs)
    with torch.no_grad():
        ours = model.compute_logits(model(ids, pos, AttentionContext.varlen(cu)))
    assert (ours - torch.cat(hf_padded_logits(hf, seqs))).abs().max().item() <= TOL


def _tree():
    """Segments (parent, length): root 4 tokens; children of 3 and 2; a grandchild of 2 under the first child."""
    return [(-1, 4), (0, 3), (0, 2), (1, 2)]


def test_tree_mask_forward_equals_per_path_forwards(hf_checkpoint):
    _, path = hf_checkpoint
    model = CausalLM.from_pretrained(path)
    segs = _tree()
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for _, n in segs]
    start, depth0 = [], []
    off = 0
    for s, (parent, n) in enumerate(segs):
        start.append(off)
        depth0.append(0 if parent < 0 else depth0[parent] + segs[parent][1])
        off += n
    T = off
    ids = torch.cat(tokens)
    pos = torch.cat([torch.arange(n) + depth0[s] for s, (_, n) in enumerate(segs)])
    seg_of = torch.cat([torch.full((n,), s) for s, (_, n) in enumerate(segs)])

    def ancestors(s):
        out = []
        while s >= 0:
            out.append(s)
            s = segs[s][0]
        return out[::-1]

    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for a in ancestors(int(seg_of[i])):
            mask[i, start[a] : start[a] + segs[a][1]] = True
    mask &= pos[None, :] <= pos[:, None]  # within the own segment: causal
    with torch.no_grad():
        packed = model(ids, pos, AttentionContext.tree(mask))
        for leaf in (2, 3):
            chain = ancestors(leaf)
            path_ids = torch.cat([tokens[a] for a in chain])
            alone = model(path_ids, torch.arange(len(path_ids)))
            rows = torch.cat([torch.arange(start[a], start[a] + segs[a][1]) for a in chain])
            assert (packed[rows] - alone).abs().max().item() <= 1e-5


def test_sdpa_padded_path_equals_per_sequence(hf_checkpoint, monkeypatch):
    """The padded SDPA fallback against one forward per sequence (no padding at all)."""
    _, path = hf_checkpoint
    model = CausalLM.from_pretrained(path)
    monkeypatch.setattr(attention_mod, "HAS_FLASH_ATTN", False)
    seqs = _ragged(model.config.vocab_size, lens=(6, 2, 9))
    ids, pos, cu = pack(seqs)
    with torch.no_grad():
        packed = model(ids, pos, AttentionContext.varlen(cu, 9))
        alone = torch.cat([model(torch.tensor(s), torch.arange(len(s))) for s in seqs])
    assert (packed - alone).abs().max().item() <= 1e-5


def test_backward_and_gradient_checkpointing_agree(hf_checkpoint):
    _, path = hf_checkpoint
    model = CausalLM.from_pretrained(path).train()
    seqs = _ragged(model.config.vocab_size, lens=(4, 7))
    ids, pos, cu = pack(seqs)

    def grads(ckpt: bool):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        logits = model.compute_logits(model(ids, pos, AttentionContext.varlen(cu, 7)))
        torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert all(plain[n].abs().sum() > 0 for n in plain)  # every parameter (biases, tied head) gets a gradient
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise(hf_checkpoint):
    _, path = hf_checkpoint
    model = CausalLM.from_pretrained(path)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="flat"):
        model(ids[None], torch.arange(3)[None])
    with pytest.raises(ValueError, match="attn_mask"):
        model(ids, torch.arange(3), AttentionContext.tree(torch.ones(4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="bool"):
        AttentionContext.tree(torch.ones(3, 3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        AttentionContext.varlen(torch.tensor([3], dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash-attn varlen / SDPA on GPU in bf16)")
def test_cuda_bf16_packed_equals_per_sequence(hf_checkpoint):
    _, path = hf_checkpoint
    model = CausalLM.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    seqs = _ragged(model.config.vocab_size, lens=(6, 2, 9))
    ids, pos, cu = pack(seqs)
    with torch.no_grad():
        packed = model(ids.cuda(), pos.cuda(), AttentionContext.varlen(cu.cuda(), 9)).float()
        alone = torch.cat([model(torch.tensor(s).cuda(), torch.arange(len(s)).cuda()) for s in seqs]).float()
    assert (packed - alone).abs().max().item() <= 0.1  # bf16 ulp at |x| ~ 4 is 0.03
