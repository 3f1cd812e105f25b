"""token_logprobs_entropy: forward and backward vs a float64 reference, on both backends."""
import pytest
import torch

from arpo_kernels import backend_for, token_logprobs_entropy, token_logprobs_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _check(logits, targets, temperature=1.0, ignore_index=-100, atol=2e-5, grad_weights=(1.0, 1.0)):
    """Runs on DEVICE; the float64 reference runs on the CPU."""
    logits, targets = logits.detach().cpu(), targets.cpu()
    x = logits.to(DEVICE).requires_grad_()
    lp, ent = token_logprobs_entropy(x, targets.to(DEVICE), temperature, ignore_index)
    lp, ent = lp.cpu(), ent.cpu()
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == targets.shape and ent.shape == targets.shape
    x64 = logits.detach().double().requires_grad_()
    lp_ref, ent_ref = token_logprobs_entropy_reference(x64, targets, temperature, ignore_index)
    scale = max(1.0, float(logits.detach().float().abs().masked_fill(logits.isinf(), 0).max()) / temperature) \
        if logits.numel() else 1.0
    torch.testing.assert_close(lp.double(), lp_ref, atol=atol * scale, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, atol=atol * scale, rtol=1e-5)
    if not logits.numel():
        return
    w_lp = torch.randn(targets.shape, dtype=torch.float64)
    w_ent = torch.randn(targets.shape, dtype=torch.float64)
    a, b = grad_weights
    loss = (lp.double() * w_lp * a).sum() + (ent.double() * w_ent * b).sum()
    loss.backward()
    ((lp_ref * w_lp * a).sum() + (ent_ref * w_ent * b).sum()).backward()
    assert x.grad.dtype == logits.dtype
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, atol=atol * 10 if logits.dtype == torch.float32
                               else 2e-2, rtol=1e-3)


@pytest.mark.parametrize("V", [1, 7, 1000, 4231])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_shapes(backend, V, n):
    logits = torch.randn(n, V) * 2
    targets = torch.randint(0, V, (n,))
    _check(logits, targets)


@pytest.mark.parametrize("V", [7, 1000])
def test_300_tokens(backend, V):
    _check(torch.randn(300, V) * 2, torch.randint(0, V, (300,)))


@pytest.mark.parametrize("V", [32003])
def test_large_vocab(backend, V):
    logits = torch.randn(3, V) * 4
    targets = torch.randint(0, V, (3,))
    _check(logits, targets)


def test_many_rows_torch_chunks(monkeypatch):
    import arpo_kernels.token_stats as ts

    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "torch")
    monkeypatch.setattr(ts, "_TORCH_CHUNK_ELEMENTS", 1000)  # forces many row chunks
    logits = torch.randn(300, 131)
    _check(logits, torch.randint(0, 131, (300,)))


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_and_leading_dims(backend, temperature):
    logits = torch.randn(2, 3, 5, 50) * 3
    targets = torch.randint(0, 50, (2, 3, 5))
    _check(logits, targets, temperature=temperature)


def test_masked_vocabulary_and_extremes(backend):
    logits = torch.randn(6, 300) * 1e4
    logits[0, 10:290] = -float("inf")        # most of the vocabulary masked
    logits[1, :] = -float("inf")
    logits[1, 5] = 3.0                         # a one-hot distribution: entropy 0
    logits[2] = 1e4                            # uniform at a huge magnitude
    logits[3] = -1e4
    targets = torch.tensor([3, 5, 17, 299, 0, 100])
    _check(logits, targets, atol=1e-6)
    lp, ent = token_logprobs_entropy(logits.to(DEVICE), targets.to(DEVICE))
    lp, ent = lp.cpu(), ent.cpu()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert abs(float(ent[1])) < 1e-6 and abs(float(lp[1])) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, dtype):
    logits = (torch.randn(9, 257) * 3).to(dtype)
    targets = torch.randint(0, 257, (9,))
    _check(logits, targets)  # reference sees the same rounded inputs; maths is fp32 either way


def test_ignore_index_gives_zero_and_no_gradient(backend):
    logits = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    targets = torch.tensor([1, -100, 3, -100, 39], device=DEVICE)
    lp, ent = token_logprobs_entropy(logits, targets)
    assert lp[1] == 0 and ent[1] == 0 and lp[3] == 0 and ent[3] == 0
    (lp.sum() + ent.sum()).backward()
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[3] == 0)
    assert logits.grad[0].abs().sum() > 0
    _check(logits, targets)
    _check(logits, torch.tensor([1, 7, 3, 7, 39]), ignore_index=7)


@pytest.mark.parametrize("which", ["logprob", "entropy"])
def test_gradient_through_one_output(backend, which):
    logits = torch.randn(4, 64)
    targets = torch.randint(0, 64, (4,))
    _check(logits, targets, grad_weights=(1.0, 0.0) if which == "logprob" else (0.0, 1.0))
    x = logits.to(DEVICE).requires_grad_()
    lp, ent = token_logprobs_entropy(x, targets.to(DEVICE))
    (lp if which == "logprob" else ent).sum().backward()  # the other output's gradient is None
    assert torch.isfinite(x.grad).all()


def test_non_contiguous_logits(backend):
    base = torch.randn(8, 2 * 33)
    logits = base[:, ::2]
    _check(logits, torch.randint(0, 33, (8,)))


def test_backend_is_inspectable(monkeypatch):
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "torch")
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ARPO_KERNEL_BACKEND"):
        backend_for(torch.zeros(1))


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(3, 5), torch.zeros(4, dtype=torch.long)), "shape"),
    (lambda: (torch.randn(3, 5), torch.zeros(3)), "integer"),
    (lambda: (torch.randn(3, 5), torch.tensor([0, 5, 1])), "out of range"),
    (lambda: (torch.randn(3, 5), torch.tensor([0, -3, 1])), "out of range"),
    (lambda: (torch.randn(3, 5).long(), torch.zeros(3, dtype=torch.long)), "dtype"),
    (lambda: (torch.randn(3, 0), torch.zeros(3, dtype=torch.long)), "V = 0"),
])
def test_bad_input(make, match):
    logits, targets = make()
    with pytest.raises(ValueError, match=match):
        token_logprobs_entropy(logits, targets)


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
