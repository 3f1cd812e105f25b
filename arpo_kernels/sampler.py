"""Token sampling that also returns the token's log-prob and the exact full-vocabulary entropy.

Why: ARPO branches a rollout where the policy's entropy is high, and the trainer needs the behaviour policy's
log-probs. Both come out of the pass that picks the token, so the engine never materialises a softmax.

    tokens, logprobs, entropies = sample(logits [B, V], temperature [B], top_p [B], top_k [B],
                                         seeds [B] int64, offsets [B] int64)

Definitions (per row; T = temperature):
* T <= 0 means greedy: token = argmax(logits) (lowest index on ties). Otherwise the token is drawn from
  softmax(logits / T) restricted to the allowed set (below).
* logprob = log_softmax(logits / T')[token] and entropy = -sum_v p_v log p_v with p = softmax(logits / T') over
  the FULL vocabulary, before any top-k / top-p truncation — the distribution ARPO measures and the trainer
  recomputes. T' = T, except T' = 1 for greedy rows. Tokens with logit -inf get p = 0 and add nothing.
* top_k <= 0 or >= V: off. Otherwise allowed = {v : z_v >= the k-th largest z} (ties at the cut stay in),
  z = logits / T.
* top_p >= 1: off. Otherwise, over softmax of z restricted to the top-k set, allowed additionally = the tokens
  whose probability is >= tau, tau the largest probability such that the tokens at least that likely carry mass
  >= top_p (the smallest nucleus reaching top_p; ties at the cut stay in).
* Randomness is counter-based: u_v = hash(seed, offset, v) in (0, 1) from a murmur3-style 32-bit mixer, identical
  in Triton and PyTorch; Gumbel-max: token = argmax over allowed v of z_v - log(-log u_v). `offset` is the
  token's position in its sequence, so a request's tokens depend only on (seed, position, logits): the same seed
  gives the same tokens whatever else is in the batch, and the Triton and PyTorch paths give the same tokens
  (up to fp32 rounding ties, which have probability ~0).

Paths: rows without top-k/top-p (the ARPO default: T = 1, top_p = 1, top_k = 0) run one Triton pass over the row
with an online log-sum-exp that yields argmax, log-prob and entropy together. Rows with a top-k/top-p filter
take their token from a PyTorch sort-based path (`_filtered_tokens`) that uses the same noise; their log-prob and
entropy still come from the single pass. Whether any row filters is a host-side fact the caller usually knows
(`has_filter=`); left as None it is read from the tensors, which costs one device sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from arpo_kernels._backend import use_triton

_MAX_BLOCK_V = 4096
_M32 = 0xFFFFFFFF
_C1, _C2, _C3 = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9  # murmur3 fmix32 multipliers, golden-ratio increment
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _mix32(x):
    """murmur3's 32-bit finaliser on uint32 (multiplies wrap mod 2**32)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _row_key(seed, offset):
    s_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    s_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    o_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    o_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k = _mix32(s_lo + 0x9E3779B9)
    k = _mix32(k ^ s_hi)
    k = _mix32(k ^ o_lo)
    return _mix32(k ^ o_hi)


@triton.jit
def _gumbel(key, idx):
    h = _mix32(key ^ (idx.to(tl.uint32) * 0x9E3779B9))
    h = _mix32(h + key)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _sample_kernel(
    logits_ptr, stride_row, temp_ptr, seed_ptr, offset_ptr,
    token_ptr, logprob_ptr, entropy_ptr, lse_ptr, V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    t = tl.load(temp_ptr + row).to(tl.float32)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    noise_on = tl.where(greedy, 0.0, 1.0)
    key = _row_key(tl.load(seed_ptr + row), tl.load(offset_ptr + row))
    NEG_INF = float("-inf")
    # online state: max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m), best candidate (y, index, z)
    m = tl.full((), NEG_INF, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    a = tl.full((), 0.0, tl.float32)
    best_y = tl.full((), NEG_INF, tl.float32)
    best_z = tl.full((), 0.0, tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(base + offs, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)  # all -inf so far: any finite reference works
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        ez = e * tl.where(e > 0.0, z - m_ref, 0.0)  # -inf logits contribute 0, not 0 * inf
        # re-reference the old terms: sum e_old (z - m_ref) = alpha * (a - s * (m_ref - m))
        shift = tl.where(s > 0.0, m_ref - m, 0.0)
        a = alpha * (a - s * shift) + tl.sum(ez, 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
        y = tl.where(mask, z + noise_on * _gumbel(key, offs), NEG_INF)
        by = tl.max(y, 0)
        bi = tl.argmax(y, 0)
        take = by > best_y  # strict: the first maximum wins, as torch.argmax
        best_z = tl.where(take, tl.sum(tl.where(offs == start + bi, z, 0.0), 0), best_z)
        best_i = tl.where(take, (start + bi).to(tl.int64), best_i)
        best_y = tl.maximum(best_y, by)
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(token_ptr + row, best_i)
    tl.store(logprob_ptr + row, best_z - lse)
    tl.store(entropy_ptr + row, log_s - a / s)
    tl.store(lse_ptr + row, lse)


def _sample_triton(logits, temperature, seeds, offsets):
    B, V = logits.shape
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs, entropies, lse = (torch.empty(B, dtype=torch.float32, device=dev) for _ in range(3))
    block = min(triton.next_power_of_2(V), _MAX_BLOCK_V)
    _sample_kernel[(B,)](
        logits, logits.stride(0), temperature, seeds, offsets, tokens, logprobs, entropies, lse, V,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return tokens, logprobs, entropies, lse


# ------------------------------------------------------------------------------------------------------------
# PyTorch (uint32 arithmetic emulated in int64, bit-identical to the kernel)
# ------------------------------------------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow: split x into 16-bit halves."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] fp32 Gumbel noise, the same numbers the kernel draws for (seed, offset, vocab index)."""
    s_lo, s_hi = seeds & _M32, (seeds >> 32) & _M32
    o_lo, o_hi = offsets & _M32, (offsets >> 32) & _M32
    k = _mix32_torch((s_lo + _C3) & _M32)
    k = _mix32_torch(k ^ s_hi)
    k = _mix32_torch(k ^ o_lo)
    k = _mix32_torch(k ^ o_hi)[:, None]
    idx = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    h = _mix32_torch(k ^ _mul32(idx, _C3))
    h = _mix32_torch((h + k) & _M32)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def _scaled(logits: torch.Tensor, temperature: torch.Tensor):
    greedy = temperature <= 0
    inv_t = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, temperature.float()))
    return logits.float() * inv_t[:, None], greedy


def _sample_torch(logits, temperature, seeds, offsets):
    z, greedy = _scaled(logits, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    p = logp.exp()
    entropies = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    tokens = z.argmax(-1)
    rows = (~greedy).nonzero()[:, 0]  # the noise is the CPU path's main cost: draw it for sampling rows only
    if rows.numel():
        noisy = z.index_select(0, rows) + gumbel_noise(seeds[rows], offsets[rows], z.shape[1])
        tokens = tokens.index_copy(0, rows, noisy.argmax(-1))
    return tokens, logp.gather(1, tokens[:, None])[:, 0], entropies, lse


def _filter_rows(temperature, top_p, top_k, V: int) -> torch.Tensor:
    return (temperature > 0) & (((top_k > 0) & (top_k < V)) | (top_p < 1))


def _filtered_tokens(z, noise, top_p, top_k) -> torch.Tensor:
    """Sort-based top-k then top-p on z = logits / T; argmax of z + noise over the allowed set."""
    V = z.shape[1]
    sorted_z, _ = z.sort(dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < V), top_k, V).long()
    kth = sorted_z.gather(1, (k - 1)[:, None])
    in_k = sorted_z >= kth
    p_sorted = torch.softmax(torch.where(in_k, sorted_z, float("-inf")), dim=-1)
    cum = p_sorted.cumsum(-1)
    r = (cum < top_p.float()[:, None]).sum(-1, keepdim=True).clamp(max=V - 1)
    tau = torch.where(top_p[:, None] >= 1, float("-inf"), sorted_z.gather(1, r))
    allowed = (z >= kth) & (z >= tau)
    return torch.where(allowed, z + noise, float("-inf")).argmax(-1)


# ------------------------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------------------------
def _check(logits, temperature, top_p, top_k, seeds, offsets) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V > 0, got {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise ValueError(f"logits dtype {logits.dtype} is not supported; use float32, bfloat16 or float16")
    B = logits.shape[0]
    for name, x, kinds in (
        ("temperature", temperature, "float"), ("top_p", top_p, "float"), ("top_k", top_k, "int"),
        ("seeds", seeds, "int64"), ("offsets", offsets, "int64"),
    ):
        if x.shape != (B,):
            raise ValueError(f"{name} must be [B]=[{B}], got {tuple(x.shape)}")
        if x.device != logits.device:
            raise ValueError(f"{name} is on {x.device} but logits are on {logits.device}")
        ok = {"float": x.is_floating_point(), "int": x.dtype in (torch.int32, torch.int64),
              "int64": x.dtype == torch.int64}[kinds]
        if not ok:
            raise ValueError(f"{name} must be {kinds}, got {x.dtype}")


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
    seeds: torch.Tensor, offsets: torch.Tensor, *, has_filter: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, logprobs [B] fp32, entropies [B] fp32); see the module docstring for definitions.

    `has_filter`: whether any row uses top-k/top-p (False skips the sort path; None = find out, one sync)."""
    _check(logits, temperature, top_p, top_k, seeds, offsets)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if use_triton(logits):
        tokens, logprobs, entropies, lse = _sample_triton(logits, temperature.float().contiguous(), seeds, offsets)
    else:
        tokens, logprobs, entropies, lse = _sample_torch(logits, temperature, seeds, offsets)
    V = logits.shape[1]
    rows = _filter_rows(temperature, top_p, top_k, V) if has_filter is not False else None
    if has_filter is None:
        has_filter = bool(rows.any())
    if has_filter:
        z, _ = _scaled(logits, temperature)
        filtered = _filtered_tokens(z, gumbel_noise(seeds, offsets, V), top_p, top_k)
        tokens = torch.where(rows, filtered, tokens)
        logprobs = torch.where(rows, z.gather(1, tokens[:, None])[:, 0] - lse, logprobs)
    return tokens, logprobs, entropies


def sample_reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
    seeds: torch.Tensor, offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch, same definitions and noise: the CPU path and the tests' reference."""
    _check(logits, temperature, top_p, top_k, seeds, offsets)
    tokens, logprobs, entropies, lse = _sample_torch(logits, temperature, seeds, offsets)
    z, _ = _scaled(logits, temperature)
    rows = _filter_rows(temperature, top_p, top_k, logits.shape[1])
    filtered = _filtered_tokens(z, gumbel_noise(seeds, offsets, logits.shape[1]), top_p, top_k)
    tokens = torch.where(rows, filtered, tokens)
    return tokens, z.gather(1, tokens[:, None])[:, 0] - lse, entropies
