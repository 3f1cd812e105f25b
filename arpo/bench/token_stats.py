"""Per-token log-prob + entropy: naive PyTorch vs torch.compile vs our chunked PyTorch vs our Triton vs Liger.

Our PyTorch path runs twice off CUDA: `arpo-torch` with its chunk bodies compiled by Inductor (the CPU default,
`arpo_kernels.token_stats_compiled`) and `arpo-torch eager` with `ARPO_COMPILE_STATS=off` (the fallback where
compiling is impossible), so compiled-vs-eager-vs-naive-vs-torch.compile(naive) sit side by side.

Workloads (each forward + backward unless named `fwd`):
- `logits fwd`: statistics from given logits (bandwidth-bound: reads T x V once; GB/s reported).
- `logits`: the same with backward to the logits.
- `linear`: from hidden states and the lm_head weight (the trainer's real path), gradients to both.
  `... fused loss` is `linear_token_loss` on the same objective (each chunk's gradient taken in the forward:
  three matmuls instead of four). The provider `matmuls` runs only the three matmuls any implementation needs
  (forward logits, d hidden, d weight) at full size, as the floor the fused path is compared with.
GPU shapes are Qwen2.5-3B's (H = 2048, V = 151,936); the CPU set is scaled down.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from arpo_kernels import token_stats_compiled
from arpo_kernels._backend import forced_backend

DOC = "log-prob + entropy from logits / from hidden states (lm_head fused): time and peak memory vs naive"
BASELINE = "naive"


@dataclass
class Case:
    kind: str  # "logits fwd" | "logits" | "linear"
    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    device: str

    @property
    def label(self) -> str:
        return f"{self.kind} T={self.tokens} H={self.hidden} V={self.vocab} {str(self.dtype).split('.')[-1]}"

    def extra(self) -> dict:
        extra = {"kind": self.kind, "tokens": self.tokens, "hidden": self.hidden, "vocab": self.vocab,
                 "dtype": str(self.dtype)}
        if self.kind == "logits fwd":  # bandwidth-bound: the logits are read once
            extra["bytes_read"] = self.tokens * self.vocab * self.dtype.itemsize
        return extra


def cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        dt, H, V = torch.bfloat16, 2048, 151936
        token_counts = [1024] if quick else [1024, 4096, 16384]
    else:
        dt = torch.float32
        H, V = (128, 8192) if quick else (512, 32768)
        token_counts = [256] if quick else [1024, 4096]
    out = []
    for t in token_counts:
        for kind in ("logits fwd", "logits", "linear"):
            out.append(Case(kind, t, H, V, dt, device))
    return out


def _naive_stats(logits: torch.Tensor, targets: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None])[:, 0], entropy


_compiled = None


def _compiled_stats():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_naive_stats, dynamic=False)
    return _compiled


def _inputs(case: Case):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(case.tokens, case.hidden, generator=g) ).to(case.device, case.dtype)
    weight = (torch.randn(case.vocab, case.hidden, generator=g) / case.hidden ** 0.5).to(case.device, case.dtype)
    targets = torch.randint(0, case.vocab, (case.tokens,), generator=g).to(case.device)
    return hidden, weight, targets


def _logits_provider(stats_fn):
    def make(case: Case):
        if case.kind == "linear":
            return None
        hidden, weight, targets = _inputs(case)
        logits = (hidden @ weight.t()).detach()
        del hidden, weight
        if case.kind == "logits fwd":
            def run():
                with torch.no_grad():
                    return stats_fn(logits, targets)
            return run
        leaf = logits.requires_grad_()

        def run():
            lp, ent = stats_fn(leaf, targets)
            (lp.sum() + ent.sum()).backward()
            leaf.grad = None
        return run
    return make


def _objective(lp, ent, *_chunk):
    """The linear workload's objective: Σ log-prob + Σ entropy (of all tokens, or of a chunk's)."""
    return lp.sum() + ent.sum()


def _stats_objective(stats_from_hidden):
    """`_objective` from a `(hidden, weight, targets) -> (lp, ent)`."""
    return lambda hidden, weight, targets: _objective(*stats_from_hidden(hidden, weight, targets))


def _linear_provider(loss_from_hidden):
    """The linear workload: `loss_from_hidden(hidden, weight, targets)` and its backward to both."""
    def make(case: Case):
        if case.kind != "linear":
            return None
        hidden, weight, targets = _inputs(case)
        hidden.requires_grad_()
        weight.requires_grad_()

        def run():
            loss_from_hidden(hidden, weight, targets).backward()
            hidden.grad = weight.grad = None
        return run
    return make


def _forced(make, backend: str, compile_mode: str = "auto"):
    """`make` with the whole call (forward and backward) on `backend` and `ARPO_COMPILE_STATS=compile_mode`: the
    backward dispatches when `.backward()` runs, so wrapping the forward alone would not choose its path."""
    def forced_make(case: Case):
        fn = make(case)
        if fn is None:
            return None

        def run():
            with forced_backend(backend), token_stats_compiled.forced_mode(compile_mode):
                return fn()
        return run
    return forced_make


def _provider(stats_fn, linear_fn):
    """A provider: `stats_fn(logits, targets)` on the logits workloads, `linear_fn(hidden, weight, targets)` on
    the linear one."""
    return lambda case: (_logits_provider(stats_fn)(case) if case.kind != "linear"
                         else _linear_provider(_stats_objective(linear_fn))(case))


def _matmuls_only(case: Case):
    if case.kind != "linear":
        return None
    hidden, weight, _ = _inputs(case)

    def run():
        logits = hidden @ weight.t()
        grad_hidden = logits @ weight
        grad_weight = logits.t() @ hidden
        return grad_hidden, grad_weight
    return run


def _fused_loss(hidden, weight, targets):
    """`linear_token_loss` on the same objective: each chunk's gradient taken in the forward."""
    from arpo_kernels import linear_token_loss

    return linear_token_loss(hidden, weight, targets, _objective)[0]


def _liger_linear(case: Case):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    if case.kind != "linear" or not case.device.startswith("cuda"):
        return None
    hidden, weight, targets = _inputs(case)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def run():  # log-probs only: Liger has no entropy output
        loss_fn(weight, hidden, targets).backward()
        hidden.grad = weight.grad = None
    return run


def providers(device: str) -> dict:
    from arpo_kernels import linear_logprobs_entropy, token_logprobs_entropy

    def naive_linear(h, w, t):
        return _naive_stats(h @ w.t(), t)

    def compiled_linear(h, w, t):
        return _compiled_stats()(h @ w.t(), t)

    ours = _provider(token_logprobs_entropy, linear_logprobs_entropy)
    out = {
        "naive": _provider(_naive_stats, naive_linear),
        "torch.compile": _provider(lambda x, t: _compiled_stats()(x, t), compiled_linear),
        "arpo-torch": _forced(ours, "torch"),
        "arpo-torch fused loss": _forced(_linear_provider(_fused_loss), "torch"),
    }
    if device.startswith("cuda"):
        out["arpo-triton"] = _forced(ours, "triton")
        out["arpo-triton fused loss"] = _forced(_linear_provider(_fused_loss), "triton")
        out["liger (logprob only)"] = _liger_linear
    else:  # the fallback where Inductor cannot compile the chunk bodies
        out["arpo-torch eager"] = _forced(ours, "torch", "off")
    out["matmuls"] = _matmuls_only
    return out
