"""linear_logprobs_entropy: hidden @ W.T statistics without whole logits, forward and backward vs float64."""
import pytest
import torch

from arpo_kernels import linear_logprobs_entropy, linear_logprobs_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(hidden, weight, targets, temperature=1.0, ignore_index=-100, chunk_elements=None, atol=1e-5):
    h = hidden.detach().to(DEVICE).requires_grad_()
    w = weight.detach().to(DEVICE).requires_grad_()
    lp, ent = linear_logprobs_entropy(h, w, targets.to(DEVICE), temperature, ignore_index,
                                      chunk_elements=chunk_elements)
    lp, ent = lp.cpu(), ent.cpu()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    lp_ref, ent_ref = linear_logprobs_entropy_reference(h64, w64, targets, temperature, ignore_index)
    torch.testing.assert_close(lp.double(), lp_ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(ent.double(), ent_ref, atol=atol, rtol=1e-4)
    if not targets.numel():
        return
    a = torch.randn(targets.shape, dtype=torch.float64)
    b = torch.randn(targets.shape, dtype=torch.float64)
    ((lp.double() * a).sum() + (ent.double() * b).sum()).backward()
    ((lp_ref * a).sum() + (ent_ref * b).sum()).backward()
    gtol = atol * 10 if hidden.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, atol=gtol, rtol=1e-3)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, atol=gtol, rtol=1e-3)


@pytest.mark.parametrize("n, H, V", [(1, 8, 7), (37, 16, 1000), (0, 8, 5), (300, 8, 33)])
@pytest.mark.parametrize("chunked", [False, True])
def test_matches_reference(backend, n, H, V, chunked):
    hidden = torch.randn(n, H)
    weight = torch.randn(V, H) / H ** 0.5
    targets = torch.randint(0, V, (n,))
    _check(hidden, weight, targets, temperature=0.8, chunk_elements=3 * V if chunked else None)


def test_leading_dims_ignore_index_and_masked_rows(backend):
    hidden = torch.randn(2, 7, 16) * 3
    weight = torch.randn(4231, 16) / 4
    targets = torch.randint(0, 4231, (2, 7))
    targets[0, 2] = -100
    targets[1, 6] = -100
    _check(hidden, weight, targets, chunk_elements=4 * 4231)
    h = hidden.to(DEVICE).requires_grad_()
    lp, ent = linear_logprobs_entropy(h, weight.to(DEVICE), targets.to(DEVICE))
    (lp.sum() + ent.sum()).backward()
    assert lp[0, 2] == 0 and ent[1, 6] == 0
    assert torch.all(h.grad[0, 2] == 0) and torch.all(h.grad[1, 6] == 0)


def test_bf16(backend):
    hidden = torch.randn(20, 32).bfloat16()
    weight = (torch.randn(257, 32) / 6).bfloat16()
    targets = torch.randint(0, 257, (20,))
    h = hidden.to(DEVICE).requires_grad_()
    w = weight.to(DEVICE).requires_grad_()
    lp, ent = linear_logprobs_entropy(h, w, targets.to(DEVICE), chunk_elements=257 * 6)
    lp, ent = lp.cpu(), ent.cpu()
    lp_ref, ent_ref = linear_logprobs_entropy_reference(hidden.double(), weight.double(), targets)
    # bf16 logits are rounded before the statistics, as in the naive bf16 path: tolerance of bf16 rounding.
    torch.testing.assert_close(lp.double(), lp_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(ent.double(), ent_ref, atol=5e-2, rtol=2e-2)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()


def test_gradient_only_for_hidden():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    lp, _ = linear_logprobs_entropy(hidden, weight, torch.randint(0, 11, (5,)))
    lp.sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(3, 8), torch.randn(10, 9), torch.zeros(3, dtype=torch.long)), "hidden size mismatch"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), "shape"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3)), "integer"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.tensor([0, 10, 2])), "out of range"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8).double(), torch.zeros(3, dtype=torch.long)), "dtype"),
    (lambda: (torch.randn(3, 8), torch.randn(10), torch.zeros(3, dtype=torch.long)), "2-D"),
])
def test_bad_input(make, match):
    hidden, weight, targets = make()
    with pytest.raises(ValueError, match=match):
        linear_logprobs_entropy(hidden, weight, targets)
