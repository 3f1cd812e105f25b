"""Fused position-wise ops (RMSNorm with the residual add, rotary on q and k with or without Qwen3's per-head
q/k norm, SiLU·up) against the eager code they replace. In fp32 the Triton path equals the reference to rounding; in
bf16 it rounds where the eager code rounds, so results are mostly bit-equal and otherwise off by a bf16 ulp or two (a
statistic that differs in its last bit, rounded twice)."""
import pytest
import torch

from arpo_kernels.fused_ops import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    rotary_qk,
    rotary_reference,
    silu_mul,
    silu_mul_reference,
)
from arpo.model.layers import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]


def _close(out, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # two bf16 ulps at most, and almost everywhere exact (the kernels round to nearest where eager rounds)
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1.6e-2)
        assert (out == ref).float().mean() > 0.95


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 80])
def test_rms_norm(backend, device, dtype, n):
    x = (torch.randn(5, n).to(dtype) * 3).to(device)
    w = (torch.rand(n) + 0.5).to(dtype).to(device)
    _close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype)
    xt = x.t().contiguous().t()  # the same values with a non-unit last stride
    _close(rms_norm(xt, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype)
    r = torch.randn(5, n).to(dtype).to(device)
    out, res = add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(res, ref_res)  # the residual add rounds exactly like the eager add
    _close(res, ref_res, dtype)
    _close(out, ref_out, dtype)


def test_rms_norm_promotes_like_eager(backend, device):
    """An fp32 weight over bf16 activations gives fp32 output, as `weight * h.to(dtype)` does."""
    x = torch.randn(3, 32).bfloat16().to(device)
    w = (torch.rand(32) + 0.5).to(device)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    _close(out, rms_norm_reference(x, w, 1e-6), torch.bfloat16)  # h is rounded to bf16 before the weight


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_strided_qkv_views(backend, device, dtype):
    t, hq, hkv, d = 6, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype).to(device)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)  # non-contiguous, as the fused projection leaves them
    cos, sin = RotaryEmbedding(d, 10000.0).to(device)(torch.tensor([0, 3, 7, 100, 2047, 5], device=device), dtype)
    q_rot, k_rot = rotary_qk(q, k, cos, sin)
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
    _close(q_rot, rotary_reference(q, cos, sin), dtype)
    _close(k_rot, rotary_reference(k, cos, sin), dtype)
    if dtype == torch.bfloat16:  # exact products, one rounding each, as eager: bit-equal, not merely close
        assert torch.equal(q_rot, rotary_reference(q, cos, sin)) and torch.equal(k_rot, rotary_reference(k, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 12])  # 12: half a head (6) is not a power of two, so the kernel masks lanes
def test_rotary_with_per_head_norm(backend, device, dtype, d):
    """Qwen3's q_norm / k_norm fused into the rotary pass equals RMSNorm then rotary, eagerly."""
    t, hq, hkv = 5, 4, 2
    qkv = (torch.randn(t, (hq + 2 * hkv) * d) * 3).to(dtype).to(device)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)
    wq, wk = ((torch.rand(d) + 0.5).to(dtype).to(device) for _ in range(2))
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cos, sin = RotaryEmbedding(d, 1e6, scaling).to(device)(torch.tensor([0, 3, 7, 100, 2047], device=device), dtype)
    q_rot, k_rot = rotary_qk(q, k, cos, sin, wq, wk, 1e-6)
    _close(q_rot, rotary_reference(rms_norm_reference(q, wq, 1e-6), cos, sin), dtype)
    _close(k_rot, rotary_reference(rms_norm_reference(k, wk, 1e-6), cos, sin), dtype)
    with pytest.raises(ValueError, match="both"):
        rotary_qk(q, k, cos, sin, wq, None)
    with pytest.raises(ValueError, match="must be"):
        rotary_qk(q, k, cos, sin, wq[:-2], wk[:-2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 1100])
def test_silu_mul(backend, device, dtype, inter):
    x = (torch.randn(3, 2 * inter).to(dtype) * 4).to(device)
    _close(silu_mul(x), silu_mul_reference(x), dtype)


def test_empty_and_bad_inputs(backend, device):
    w = torch.ones(8, device=device)
    assert rms_norm(torch.empty(0, 8, device=device), w, 1e-6).shape == (0, 8)
    assert silu_mul(torch.empty(0, 16, device=device)).shape == (0, 8)
    with pytest.raises(ValueError, match="even last dimension"):
        silu_mul(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(torch.randn(2, 8, device=device), torch.randn(3, 8, device=device), w, 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        rotary_qk(*(torch.randn(*shape, device=device) for shape in ((2, 2, 8), (2, 1, 8), (3, 8), (3, 8))))


@pytest.mark.parametrize("arch", ["Qwen2Config", "Qwen3Config", "LlamaConfig"])
def test_model_inference_forward_equals_training_forward(backend, device, arch):
    """The model's no-grad forward (fused kernels, residual carried into the next norm, Qwen3's q/k norm inside
    the rotary kernel) gives the numbers of its autograd forward, which is the eager layer code."""
    import transformers

    from arpo.model import CausalLM
    from arpo.model.config import ModelConfig

    extra = {} if arch == "Qwen2Config" else dict(attention_bias=True, head_dim=12)
    cfg = ModelConfig.from_dict(getattr(transformers, arch)(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **extra).to_dict())
    torch.manual_seed(0)
    model = CausalLM(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.to(device)
    ids = torch.randint(0, 97, (9,), device=device)
    pos = torch.arange(9, device=device)
    with torch.no_grad():
        fast = model(ids, pos)
    slow = model(ids, pos)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)


def test_non_finite_values_propagate_like_eager(backend, device):
    """NaN and inf pass through the kernels' rounding as through eager bf16 ops (a NaN never becomes a number)."""
    x = torch.randn(2, 16)
    x[0, 3], x[1, 9], x[1, 2] = float("nan"), float("inf"), 3e38  # 3e38 * up may overflow to inf in bf16
    x = x.bfloat16().to(device)
    out, ref = silu_mul(x), silu_mul_reference(x)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    _close(out[finite], ref[finite], torch.bfloat16)
