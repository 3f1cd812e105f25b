"""segmented_policy_loss: the Triton kernel equals the PyTorch reference, and the per-token coefficients
equal the explicit per-(token, leaf) dual-clip PPO sum they stand for."""
import pytest
import torch

from arpo_kernels.policy_loss import (
    PolicyLossWeights,
    segmented_policy_loss,
    segmented_policy_loss_from_hidden,
    segmented_policy_loss_reference,
)

OPTIONS = [
    {},
    {"clip_low": 0.1, "clip_high": 0.28, "dual_clip": 2.0},
    {"kl_coef": 0.3, "with_ref": True},
    {"entropy_clip": True},
    {"entropy_adv_coef": 0.2},
    {"entropy_adv_coef": 0.9, "entropy_clip": True, "kl_coef": 0.1, "with_ref": True},
]


def random_case(T: int, n_leaves: int = 4, device="cpu", seed: int = 0):
    """Per-token leaf sets with random advantages/weights, and log-probs spread over every clip region."""
    g = torch.Generator().manual_seed(seed)
    member = torch.rand(T, n_leaves, generator=g) < 0.6
    member[torch.rand(T, generator=g) < 0.1] = False  # some tokens in no leaf: not in the loss
    adv = torch.randn(n_leaves, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    w = torch.rand(n_leaves, generator=g, dtype=torch.float64)
    m = member.double()
    weights = PolicyLossWeights(m @ (w * adv.clamp(min=0)), m @ (w * (-adv).clamp(min=0)), m @ w, m.sum(1),
                                m @ (adv > 0).double(), m @ (adv < 0).double())
    logp = -torch.rand(T, generator=g) * 4
    old = logp + torch.randn(T, generator=g) * 0.6  # ratios from ~0.2 to ~5: both clips and the dual clip
    old[: T // 10] = logp[: T // 10]  # exactly on-policy tokens (r = 1)
    ref = logp + torch.randn(T, generator=g)
    ref[-1:] = logp[-1:] + 25.0  # beyond the ±20 clamp
    ent = torch.rand(T, generator=g) * 3
    to = lambda x: x.to(device)  # noqa: E731
    weights = PolicyLossWeights(*(to(x.float()) for x in weights))
    return to(logp), to(old), to(ref), to(ent), weights, (member, adv, w)


def call(fn, logp, old, ref, ent, weights, opts):
    opts = dict(opts)
    with_ref = opts.pop("with_ref", False)
    x = logp.clone().requires_grad_()
    loss, metrics = fn(x, old, weights, ref_logprobs=ref if with_ref else None, entropy=ent, **opts)
    loss.backward()
    return loss.detach(), x.grad, metrics


@pytest.mark.parametrize("T", [1, 37, 2500])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_kernel_matches_reference(backend, device, T, opts):
    logp, old, ref, ent, weights, _ = random_case(T, device=device, seed=T)
    got = call(segmented_policy_loss, logp, old, ref, ent, weights, opts)
    want = call(segmented_policy_loss_reference, logp, old, ref, ent, weights, opts)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-5, atol=1e-6, msg=k)


def ppo_token_leaf(r, A, lo, hi, c):
    """verl's dual-clip surrogate for one advantage per element (the expression the coefficients compress)."""
    l1, l2 = -A * r, -A * torch.clamp(r, lo, hi)
    cl1 = torch.maximum(l1, l2)
    return torch.where(A < 0, torch.minimum(-A * c, cl1), cl1)


@pytest.mark.parametrize("opts", [{}, {"clip_low": 0.25, "clip_high": 0.1, "dual_clip": 1.5}])
def test_coefficients_equal_sum_over_leaves(opts):
    logp, old, _, _, weights, (member, adv, w) = random_case(300, n_leaves=5, seed=3)
    x = logp.clone().double().requires_grad_()
    r = torch.exp(x - old.double())[:, None]
    lo, hi = 1 - opts.get("clip_low", 0.2), 1 + opts.get("clip_high", 0.2)
    per = ppo_token_leaf(r, adv[None, :], lo, hi, opts.get("dual_clip", 3.0))
    want = (per * w[None, :] * member).sum()
    want.backward()
    got = call(segmented_policy_loss_reference, logp, old, None, None, weights, opts)
    torch.testing.assert_close(got[0].double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), x.grad, rtol=1e-5, atol=1e-6)


def test_metrics_definitions():
    logp, old, ref, ent, weights, _ = random_case(500, seed=5)
    _, _, m = call(segmented_policy_loss_reference, logp, old, ref, ent, weights, {"with_ref": True})
    r = torch.exp(logp - old)
    n = weights.count.sum()
    want_clip = ((weights.count_pos * (r > 1.2) + weights.count_neg * (r < 0.8)).sum() / n)
    torch.testing.assert_close(m["clip_frac"], want_clip)
    torch.testing.assert_close(m["approx_kl"], (weights.count * (old - logp)).sum() / n)
    torch.testing.assert_close(m["entropy"], (weights.count * ent).sum() / n)
    assert 0.0 < m["clip_frac"] < 1.0 and 0.0 < m["dual_clip_frac"] < 1.0 and m["kl"] > 0


def test_zero_weights_give_zero_loss_and_grad(backend, device):
    logp, old, ref, ent, weights, _ = random_case(64, device=device)
    zero = PolicyLossWeights(*(torch.zeros_like(x) for x in weights))
    loss, grad, _ = call(segmented_policy_loss, logp, old, ref, ent, zero, {"kl_coef": 1.0, "with_ref": True})
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_from_hidden_matches_logsoftmax(backend, device):
    T, H, V = 29, 16, 40
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T + 5, H, generator=g).to(device).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.3).to(device).requires_grad_()
    index = torch.randint(0, T + 5, (T,), generator=g).to(device)
    targets = torch.randint(0, V, (T,), generator=g).to(device)
    _, old, _, _, weights, _ = random_case(T, device=device, seed=2)
    loss, m = segmented_policy_loss_from_hidden(hidden, W, targets, old, weights, index=index, temperature=0.7)
    loss.backward()
    h2, W2 = hidden.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    lsm = torch.log_softmax((h2[index] @ W2.T) / 0.7, -1)
    ent = -(lsm.exp() * lsm).sum(-1)
    want, wm = segmented_policy_loss_reference(lsm.gather(1, targets[:, None])[:, 0], old, weights, entropy=ent)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["entropy"], wm["entropy"], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    logp, old, ref, ent, weights, _ = random_case(10)
    with pytest.raises(ValueError, match="old_logprobs must have the shape"):
        segmented_policy_loss(logp, old[:5], weights)
    with pytest.raises(ValueError, match="logprobs must be 1-D"):
        segmented_policy_loss(logp[None], old[None], weights)
    with pytest.raises(ValueError, match="weights.count must have the shape"):
        segmented_policy_loss(logp, old, weights._replace(count=weights.count[:3]))
    with pytest.raises(ValueError, match="PolicyLossWeights"):
        segmented_policy_loss(logp, old, tuple(weights))
    with pytest.raises(ValueError, match="dual_clip"):
        segmented_policy_loss(logp, old, weights, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        segmented_policy_loss(logp, old, weights, clip_low=1.0)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        segmented_policy_loss(logp, old, weights, entropy_adv_coef=0.2)
    with pytest.raises(ValueError, match="floating point"):
        segmented_policy_loss(logp, old.long(), weights)
