"""The sampler: Triton and PyTorch agree token for token; log-prob/entropy against float64; greedy = argmax;
empirical frequencies follow the (truncated) softmax; top-k/top-p are respected; seeded draws do not depend on
the rest of the batch; bad inputs are rejected."""
import pytest
import torch

from arpo_kernels import sampler as S
from arpo_kernels.sampler import gumbel_noise, sample, sample_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _on(logits, p):
    return logits.to(DEV), {k: v.to(DEV) for k, v in p.items()}


def _sample(logits, p):
    logits, p = _on(logits, p)
    return sample(logits, **p)


def _params(B, T=1.0, top_p=1.0, top_k=0, seed0=0, offset0=0):
    full = lambda v, dt: v if torch.is_tensor(v) else torch.full((B,), v, dtype=dt)  # noqa: E731
    return dict(
        temperature=full(T, torch.float32), top_p=full(top_p, torch.float32), top_k=full(top_k, torch.int64),
        seeds=torch.arange(B, dtype=torch.int64) + seed0, offsets=torch.arange(B, dtype=torch.int64) + offset0,
    )


def _mixed_rows(B, V, gen):
    """Logits with some -inf entries; temperatures incl. greedy; a few rows with top-k / top-p."""
    logits = 2.5 * torch.randn(B, V, generator=gen)
    logits[0, :3] = float("-inf")
    p = _params(B)
    p["temperature"] = torch.tensor([1.0, 0.0, 0.7, 1.6, 1.0, 0.0, 1.0, 0.3])[:B]
    p["top_k"][3] = 5
    p["top_p"][4] = 0.6
    p["top_k"][6], p["top_p"][6] = 20, 0.9
    p["seeds"] = torch.tensor([7, -3, 2**40 + 1, 11, 5, 5, 123456789, 0])[:B]
    p["offsets"] = torch.tensor([0, 1, 17, 2**33, 4, 4, 99, 3])[:B]
    return logits, p


@pytest.mark.parametrize("V, block", [(1003, 256), (37, 4096)])
def test_triton_and_torch_paths_agree(monkeypatch, V, block):
    monkeypatch.setattr(S, "_MAX_BLOCK_V", block)  # several vocab blocks: the online merge is exercised
    logits, p = _on(*_mixed_rows(8, V, torch.Generator().manual_seed(V)))
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "triton")
    t_tok, t_lp, t_ent = sample(logits, **p)
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "torch")
    r_tok, r_lp, r_ent = sample(logits, **p)
    assert torch.equal(t_tok, r_tok)
    torch.testing.assert_close(t_lp, r_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(t_ent, r_ent, rtol=0, atol=2e-5)
    ref = sample_reference(logits, **p)
    assert torch.equal(ref[0], r_tok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_and_entropy_against_float64(backend, dtype):
    logits, p = _mixed_rows(8, 301, torch.Generator().manual_seed(1))
    logits, p = _on(logits.to(dtype), p)
    tok, lp, ent = sample(logits, **p)
    t = torch.where(p["temperature"] > 0, p["temperature"], 1.0).double()
    logp = torch.log_softmax(logits.double() / t[:, None], dim=-1)  # full vocabulary, no truncation
    ref_ent = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
    torch.testing.assert_close(lp.double(), logp.gather(1, tok[:, None])[:, 0], rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-5)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert torch.isfinite(logp.gather(1, tok[:, None])).all()  # never a -inf (banned) token


def test_greedy_is_argmax_with_first_index_ties(backend, monkeypatch):
    monkeypatch.setattr(S, "_MAX_BLOCK_V", 64)
    logits = torch.randn(5, 200, generator=torch.Generator().manual_seed(2))
    logits[1, 10] = logits[1, 150] = 9.0  # tie across vocab blocks
    logits[2, 70] = logits[2, 71] = 9.0  # tie within a block
    p = _params(5, T=0.0, top_p=0.5, top_k=3)  # filters do not affect greedy rows
    tok, lp, _ = _sample(logits, p)
    tok, lp = tok.cpu(), lp.cpu()
    assert torch.equal(tok, logits.argmax(-1))
    assert tok[1] == 10 and tok[2] == 70
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])


def _frequencies(probs: torch.Tensor, n: int, by: str, **kw) -> torch.Tensor:
    logits = probs.log()[None].expand(n, -1).contiguous()
    p = _params(n, **kw)
    if by == "offset":
        p["seeds"] = torch.full((n,), 42, dtype=torch.int64)
    tok, _, _ = _sample(logits, p)
    return torch.bincount(tok.cpu(), minlength=probs.numel()).double()


def _chi2(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    n = counts.sum()
    keep = expected_probs > 0
    assert counts[~keep].sum() == 0, "sampled a token with zero probability"
    e = n * expected_probs[keep]
    return float(((counts[keep] - e) ** 2 / e).sum())


# chi-square with <= 7 degrees of freedom: P(chi2 > 30) < 1e-4, so a correct sampler essentially never fails,
# while a wrong temperature or a biased hash moves the statistic into the hundreds at n = 4000.
CHI2_LIMIT = 30.0


@pytest.mark.parametrize("by", ["seed", "offset"])
def test_frequencies_follow_tempered_softmax(by):
    probs = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02], dtype=torch.float64)
    counts = _frequencies(probs.float(), 4000, by, T=0.8)
    expected = torch.softmax(probs.log() / 0.8, -1)
    assert _chi2(counts, expected) < CHI2_LIMIT


def test_frequencies_follow_truncated_softmax():
    probs = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02], dtype=torch.float64)
    counts = _frequencies(probs.float(), 4000, "seed", top_k=3)
    assert _chi2(counts, torch.where(torch.arange(8) < 3, probs, 0.0) / probs[:3].sum()) < CHI2_LIMIT
    counts = _frequencies(probs.float(), 4000, "seed", top_p=0.6)  # nucleus: 0.30 + 0.20 + 0.15 >= 0.6
    assert _chi2(counts, torch.where(torch.arange(8) < 3, probs, 0.0) / probs[:3].sum()) < CHI2_LIMIT
    counts = _frequencies(probs.float(), 4000, "seed", top_k=5, top_p=0.7)  # renormalised top-5, then 0.7
    top5 = probs[:5] / probs[:5].sum()
    n_keep = int((top5.cumsum(0) < 0.7).sum()) + 1
    expected = torch.where(torch.arange(8) < n_keep, probs, 0.0)
    assert _chi2(counts, expected / expected.sum()) < CHI2_LIMIT


def test_topk_topp_respected(backend):
    gen = torch.Generator().manual_seed(4)
    B, V = 64, 97
    logits = 3 * torch.randn(B, V, generator=gen)
    top_k = torch.randint(1, 10, (B,), generator=gen)
    top_p = torch.rand(B, generator=gen) * 0.9 + 0.05
    k_only = torch.arange(B) % 2 == 0
    p = _params(B, T=1.3)
    p["top_k"] = torch.where(k_only, top_k, 0)
    p["top_p"] = torch.where(k_only, 1.0, top_p)
    tok = _sample(logits, p)[0].cpu()
    z = logits.double() / 1.3
    rank = (z > z.gather(1, tok[:, None])).sum(-1)  # how many tokens are strictly more likely
    assert (rank[k_only] < top_k[k_only]).all()
    probs, _ = torch.softmax(z, -1).sort(-1, descending=True)
    nucleus = (probs.cumsum(-1) < top_p[:, None].double()).sum(-1) + 1  # smallest prefix reaching top_p
    assert (rank[~k_only] < nucleus[~k_only]).all()


def test_seeded_tokens_do_not_depend_on_the_batch(backend):
    gen = torch.Generator().manual_seed(5)
    V = 211
    mine = torch.randn(V, generator=gen)
    solo = _sample(mine[None], _params(1, T=0.9, seed0=77, offset0=13))
    others = torch.randn(6, V, generator=gen)
    batch = torch.cat([others[:4], mine[None], others[4:]])
    p = _params(7, T=0.9)
    p["seeds"][4], p["offsets"][4] = 77, 13
    got = _sample(batch, p)
    assert got[0][4] == solo[0][0]
    torch.testing.assert_close(got[1][4], solo[1][0])
    torch.testing.assert_close(got[2][4], solo[2][0])
    again = _sample(batch, p)
    assert torch.equal(again[0], got[0])


def test_noise_is_uniform_and_decorrelated():
    g = gumbel_noise(torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]), 50_000)
    u = torch.exp(-torch.exp(-g.double()))  # back to the uniforms
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    for a, b in ((0, 1), (0, 2), (1, 2)):  # other seed / other offset: unrelated streams
        assert abs(torch.corrcoef(torch.stack([u[a], u[b]]))[0, 1].item()) < 0.02


def test_bad_inputs_raise():
    logits = torch.randn(3, 10)
    p = _params(3)
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0], **p)
    with pytest.raises(ValueError, match="logits dtype"):
        sample(logits.double(), **p)
    with pytest.raises(ValueError, match="seeds"):
        sample(logits, **{**p, "seeds": p["seeds"].int()})
    with pytest.raises(ValueError, match="top_k"):
        sample(logits, **{**p, "top_k": p["top_k"][:2]})
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, **{**p, "temperature": torch.ones(3, dtype=torch.long)})
