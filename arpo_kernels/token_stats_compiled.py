"""The row statistics of `token_stats` as chunk bodies fused by torch.compile (Inductor): the fast CPU path.

Why: off CUDA the statistics run as PyTorch ops over a chunk of logits, and eagerly each op is a full pass over
the chunk with its own temporary: log_softmax, exp, the product, the sum, then in backward the shifted logits,
the exp, the coefficients, the nan fix, the copy out — about a dozen passes over `rows x V` floats, which on a
2-core CPU cost more than the lm_head matmuls themselves. Inductor compiles each body into one or two C++ loops
(vectorised, multithreaded) that read the chunk once or twice and write only the outputs: forward 4-10x, backward
5-10x faster than the eager ops on the shapes measured (benchmarks/RESULTS.md). The matmuls stay library calls
outside the bodies.

Same definitions as `arpo_kernels.token_stats` (z = logits / T, p = softmax(z)); the forward uses the shifted form
entropy = log s - Σ e (z - m) / s with m = max z, e = exp(z - m), s = Σ e, which needs no log-softmax tensor.
Entries at -inf have e = 0 and contribute nothing (the `where`s), as in the eager path.

One compile per dtype and backward variant: rows, V and strides are dynamic, so the trainer's changing chunk
lengths never recompile. `available()` says whether the compiled bodies run: `ARPO_COMPILE_STATS=off` turns them
off, a body that fails to compile (no C++ toolchain, an unsupported platform) turns them off for the process with
one warning, and inside an outer torch.compile trace the eager bodies are used (the outer compile fuses them).
"""
from __future__ import annotations

import os
import warnings

import torch

from arpo_kernels._backend import env_override

_MODES = ("auto", "off")
_failed: str | None = None  # why compiling failed, once it has
_compiled: dict[str, object] = {}


def _forward_body(logits, targets, valid, inv_temp):
    z = logits.float() * inv_temp
    m = z.amax(-1, keepdim=True)
    zs = z - m
    e = zs.exp()
    s = e.sum(-1)
    log_s = s.log()
    ent = log_s - torch.where(e > 0, e * zs, 0.0).sum(-1) / s
    lse = m[:, 0] + log_s
    lp = z.gather(1, targets[:, None])[:, 0] - lse
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero), torch.where(valid, lse, zero)


def _grad(logits, targets, valid, lse, entropy, g_lp, g_h, inv_temp):
    # d/dz = g_lp (onehot - p) - g_h p (log p + H), times 1/T for d/dlogits; rows with valid = 0 get 0
    z = logits.float() * inv_temp
    gl = torch.where(valid, g_lp, 0.0)[:, None]
    gh = torch.where(valid, g_h, 0.0)[:, None]
    logp = z - lse[:, None]
    p = logp.exp()
    g = torch.where(p > 0, p * (-(gl + gh * entropy[:, None]) - gh * logp), 0.0)
    cols = torch.arange(z.shape[1], device=z.device)
    g = g + torch.where(cols[None, :] == targets[:, None], gl, 0.0)
    return g * inv_temp


def _backward_body(logits, targets, valid, lse, entropy, g_lp, g_h, inv_temp):
    return _grad(logits, targets, valid, lse, entropy, g_lp, g_h, inv_temp).to(logits.dtype)


def _backward_inplace_body(logits, targets, valid, lse, entropy, g_lp, g_h, inv_temp):
    logits.copy_(_grad(logits, targets, valid, lse, entropy, g_lp, g_h, inv_temp))


_BODIES = {"forward": _forward_body, "backward": _backward_body, "backward_inplace": _backward_inplace_body}


def mode() -> str:
    choice = os.environ.get("ARPO_COMPILE_STATS", "auto").lower()
    if choice not in _MODES:
        raise ValueError(f"ARPO_COMPILE_STATS={choice!r}: expected one of {', '.join(_MODES)}")
    return choice


def forced_mode(choice: str):
    """Run the enclosed statistics with `ARPO_COMPILE_STATS=choice` ('auto' | 'off'), restoring the previous one."""
    return env_override("ARPO_COMPILE_STATS", choice, _MODES, what="ARPO_COMPILE_STATS mode")


def available() -> bool:
    """True when the torch path's statistics run through the compiled bodies (see the module docstring)."""
    return mode() == "auto" and _failed is None and not torch.compiler.is_compiling()


def _run(name: str, *args):
    """The compiled body `name` on `args`, or the eager body when compiling is off or has failed."""
    global _failed
    body = _BODIES[name]
    if not available():
        return body(*args)
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(body, dynamic=True)
    try:
        return fn(*args)
    except Exception as exc:  # Inductor needs a working C++ toolchain; without one, stay correct and eager
        _failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"torch.compile of the token-statistics bodies failed, using the eager ones: {_failed}",
                      RuntimeWarning, stacklevel=3)
        return body(*args)


def _prepare(targets1d, V: int, ignore_index: int, temperature: float, device):
    valid = targets1d != ignore_index
    tgt = torch.where(valid, targets1d, 0).long().clamp_(0, V - 1)
    return tgt, valid, torch.tensor(1.0 / temperature, dtype=torch.float32, device=device)


def stats_forward(logits2d, targets1d, temperature: float, ignore_index: int):
    """(logprob, entropy, lse) of one chunk of rows, in fp32."""
    tgt, valid, inv_temp = _prepare(targets1d, logits2d.shape[1], ignore_index, temperature, logits2d.device)
    return _run("forward", logits2d, tgt, valid, inv_temp)


def stats_backward(logits2d, targets1d, lse, entropy, g_lp, g_h, temperature: float, ignore_index: int, out=None):
    """d(loss)/d(logits) of one chunk of rows; `out=logits2d` overwrites the logits in place, any other `out` is
    written with the result."""
    tgt, valid, inv_temp = _prepare(targets1d, logits2d.shape[1], ignore_index, temperature, logits2d.device)
    if out is logits2d:
        _run("backward_inplace", logits2d, tgt, valid, lse, entropy, g_lp, g_h, inv_temp)
        return logits2d
    grad = _run("backward", logits2d, tgt, valid, lse, entropy, g_lp, g_h, inv_temp)
    if out is None:
        return grad
    out.copy_(grad)
    return out
