"""The CPU statistics with their chunk bodies compiled (the default) and with `ARPO_COMPILE_STATS=off` (the eager
fallback) agree with each other and with the naive reference, values and gradients, on the logits and lm_head paths."""
import pytest
import torch

from arpo_kernels import (
    linear_logprobs_entropy,
    linear_logprobs_entropy_reference,
    token_logprobs_entropy,
    token_logprobs_entropy_reference,
)
from arpo_kernels import token_stats_compiled


def _inputs(n=23, H=16, V=517, dtype=torch.float32):
    hidden = torch.randn(n, H) * 2
    weight = torch.randn(V, H) / H ** 0.5
    targets = torch.randint(0, V, (n,))
    targets[[3, 11]] = -100  # ignored rows
    return hidden.to(dtype), weight.to(dtype), targets


def _linear(mode, hidden, weight, targets, a, b):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with token_stats_compiled.forced_mode(mode):
        lp, ent = linear_logprobs_entropy(h, w, targets, temperature=0.7, chunk_elements=5 * weight.shape[0])
        ((lp * a).sum() + (ent * b).sum()).backward()
        assert token_stats_compiled.available() == (mode == "auto")
    return lp.detach(), ent.detach(), h.grad, w.grad


def _logits(mode, logits, targets, a, b):
    x = logits.clone().requires_grad_()
    with token_stats_compiled.forced_mode(mode):
        lp, ent = token_logprobs_entropy(x, targets, temperature=1.3)
        ((lp * a).sum() + (ent * b).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "torch")


def test_linear_compiled_eager_and_reference_agree():
    hidden, weight, targets = _inputs()
    a, b = torch.randn(targets.shape), torch.randn(targets.shape)
    compiled = _linear("auto", hidden, weight, targets, a, b)
    assert token_stats_compiled._failed is None, token_stats_compiled._failed  # the compiled bodies did run
    eager = _linear("off", hidden, weight, targets, a, b)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp, ent = linear_logprobs_entropy_reference(h64, w64, targets, temperature=0.7)
    ((lp * a.double()).sum() + (ent * b.double()).sum()).backward()
    reference = (lp.detach(), ent.detach(), h64.grad, w64.grad)
    for got_c, got_e, ref in zip(compiled, eager, reference):
        torch.testing.assert_close(got_c, got_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_c.double(), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_e.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.all(compiled[0][[3, 11]] == 0) and torch.all(eager[2][[3, 11]] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_with_masked_entries_compiled_eager_and_reference_agree(dtype):
    logits = (torch.randn(19, 301) * 4).to(dtype)
    logits[0, :150] = -float("inf")  # a row with half its vocabulary masked: p log p := 0 at p = 0
    logits[5, 7] = -float("inf")
    targets = torch.randint(150, 301, (19,))
    targets[9] = -100
    a, b = torch.randn(targets.shape), torch.randn(targets.shape)
    compiled = _logits("auto", logits, targets, a, b)
    eager = _logits("off", logits, targets, a, b)
    x64 = logits.double().requires_grad_()
    lp, ent = token_logprobs_entropy_reference(x64, targets, temperature=1.3)
    ((lp * a.double()).sum() + (ent * b.double()).sum()).backward()
    reference = (lp.detach(), ent.detach(), x64.grad)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for got_c, got_e, ref in zip(compiled, eager, reference):
        assert torch.isfinite(got_c).all() and torch.isfinite(got_e).all()
        torch.testing.assert_close(got_c.double(), got_e.double(), **tol)
        torch.testing.assert_close(got_c.double(), ref, **tol)
        torch.testing.assert_close(got_e.double(), ref, **tol)
    assert torch.all(compiled[2][0, :150] == 0) and torch.all(eager[2][0, :150] == 0)


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ARPO_COMPILE_STATS", "sometimes")
    with pytest.raises(ValueError, match="ARPO_COMPILE_STATS='sometimes'"):
        token_stats_compiled.available()
    with pytest.raises(ValueError, match="expected one of auto, off"):
        with token_stats_compiled.forced_mode("on"):
            pass
