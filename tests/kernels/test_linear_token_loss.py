"""linear_token_loss: a separable per-token loss from hidden states, gradient taken in the forward, vs unfused."""
import pytest
import torch

from arpo_kernels import linear_logprobs_entropy, linear_token_loss, segmented_policy_loss
from arpo_kernels.policy_loss import PolicyLossWeights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _policy_loss_fn(old, w, ref, entropy_coef):
    """The trainer's per-token loss: clipped policy loss + KL to a reference - an entropy bonus."""
    def loss_fn(lp, ent, a, b):
        wc = PolicyLossWeights(*(t[a:b] for t in w))
        loss, _ = segmented_policy_loss(lp, old[a:b], wc, entropy=ent.detach(), kl_coef=0.1,
                                        ref_logprobs=None if ref is None else ref[a:b])
        return loss - entropy_coef * (wc.weight * ent).sum()
    return loss_fn


def _weights(n):
    adv = torch.randn(n, dtype=torch.float64)
    pos, neg = (adv.clamp(min=0) / n), (-adv.clamp(max=0) / n)
    count = torch.ones(n, dtype=torch.float64)
    return PolicyLossWeights(pos, neg, torch.full((n,), 1.0 / n, dtype=torch.float64), count,
                             (adv > 0).double(), (adv < 0).double())


def _grads(fused, hidden, weight, targets, loss_fn, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    if fused:
        loss, lp, ent = linear_token_loss(h, w, targets, loss_fn, **kw)
    else:
        chunk = kw.pop("chunk_elements", None)
        lp, ent = linear_logprobs_entropy(h, w, targets, chunk_elements=chunk, **kw)
        loss = loss_fn(lp.reshape(-1), ent.reshape(-1), 0, targets.numel())
    loss.backward()
    return loss.detach(), lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("n, H, V, chunk", [(1, 8, 7, None), (37, 16, 1000, 3 * 1000), (300, 8, 33, 7 * 33),
                                            (50, 16, 257, 257)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_policy_loss_equals_unfused(backend, n, H, V, chunk, with_ref):
    hidden = torch.randn(n, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) / H ** 0.5
    targets = torch.randint(0, V, (n,), device=DEVICE)
    targets[::5] = -100
    old = (torch.randn(n, device=DEVICE) * 0.1 - 3.0)
    ref = (torch.randn(n, device=DEVICE) * 0.1 - 3.0) if with_ref else None
    w = PolicyLossWeights(*(t.float().to(DEVICE) for t in _weights(n)))
    loss_fn = _policy_loss_fn(old, w, ref, entropy_coef=0.01)
    kw = dict(temperature=0.7, chunk_elements=chunk)
    fused = _grads(True, hidden, weight, targets, loss_fn, **kw)
    plain = _grads(False, hidden, weight, targets, loss_fn, **kw)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_nll_leading_dims_matches_cross_entropy():
    hidden = torch.randn(3, 11, 16)
    weight = torch.randn(300, 16) / 4
    targets = torch.randint(0, 300, (3, 11))
    targets[1, 4] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, lp, _ = linear_token_loss(h, w, targets, lambda lp, ent, a, b: -lp.sum(), chunk_elements=4 * 300)
    (loss * 2.5).backward()  # the upstream gradient scales the stored ones
    h2 = hidden.double().requires_grad_()
    w2 = weight.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h2 @ w2.t()).reshape(-1, 300), targets.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    (ref * 2.5).backward()
    assert lp.shape == targets.shape and lp[1, 4] == 0 and not lp.requires_grad
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w2.grad, atol=1e-5, rtol=1e-4)


def test_weight_without_grad_and_no_grad_mode():
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(13, 8)
    targets = torch.randint(0, 13, (9,))
    loss, _, _ = linear_token_loss(hidden, weight, targets, lambda lp, ent, a, b: ent.sum())
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        loss2, lp, ent = linear_token_loss(hidden, weight, targets, lambda lp, ent, a, b: ent.sum())
    assert not loss2.requires_grad
    torch.testing.assert_close(loss2, loss.detach())
    # a loss that ignores both statistics: zero gradient, not an error
    h = torch.randn(4, 8, requires_grad=True)
    linear_token_loss(h, weight, targets[:4], lambda lp, ent, a, b: torch.zeros(()))[0].backward()
    assert torch.all(h.grad == 0)


def test_empty_tokens():
    h = torch.randn(0, 8, requires_grad=True)
    loss, lp, ent = linear_token_loss(h, torch.randn(5, 8), torch.zeros(0, dtype=torch.long),
                                      lambda lp, ent, a, b: lp.sum())
    loss.backward()
    assert loss == 0 and lp.shape == (0,) and h.grad.shape == (0, 8)


def test_second_backward_is_refused():
    h = torch.randn(4, 8, requires_grad=True)
    loss, _, _ = linear_token_loss(h, torch.randn(5, 8), torch.randint(0, 5, (4,)), lambda lp, ent, a, b: lp.sum())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("loss_fn, match", [
    ("not callable", "loss_fn must be callable"),
    (lambda lp, ent, a, b: lp, "one-element tensor"),
    (lambda lp, ent, a, b: 1.0, "one-element tensor"),
])
def test_bad_loss_fn(loss_fn, match):
    with pytest.raises(ValueError, match=match):
        linear_token_loss(torch.randn(4, 8), torch.randn(5, 8), torch.randint(0, 5, (4,)), loss_fn)


def test_bad_inputs_named():
    fn = lambda lp, ent, a, b: lp.sum()  # noqa: E731
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_token_loss(torch.randn(4, 8), torch.randn(5, 7), torch.randint(0, 5, (4,)), fn)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_loss(torch.randn(4, 8), torch.randn(5, 8), torch.randint(0, 5, (4,)), fn, temperature=0)
    with pytest.raises(ValueError, match="chunk_elements"):
        linear_token_loss(torch.randn(4, 8), torch.randn(5, 8), torch.randint(0, 5, (4,)), fn, chunk_elements=0)
