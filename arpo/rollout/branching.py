"""The branching rule of ARPO's entropy-adaptive rollout (../shared/ARPO.md §2 and AEPO §6) as pure functions.

    H_init  = entropy of the trajectory's first k sampled tokens (tool-result tokens are not sampled), reduced
    H_t     = entropy of the k tokens sampled right after the t-th tool result, reduced the same way
    reduce  = sum over the tokens (`sum`, the reference's and the paper's) | their mean (`mean`)
    ΔH_t    = (H_t − H_init) / log|V|
    P_t     = (α + β·ΔH_t) · max(0, 1 − rate·consecutive)      (the factor only with the AEPO branch penalty)
    branch  = P_t > τ                   rule "threshold" (the paper; our default)
            = u < clip(P_t, 0, 1)       rule "bernoulli" (the reference code), u ~ U[0, 1)

Why the reduction matters: with `mean`, ΔH is about 1/k of the reference's (each per-token entropy is at most
log|V|, so a mean ΔH lies in [−1, 1] and a sum in [−k, k]); with β = 0.2 the mean then moves P by at most ±0.2
and usually by a few hundredths — the entropy barely decides anything by its size. Under `threshold` with α = τ
only ΔH's sign matters, and the two reductions agree whenever both windows hold k tokens (a window is shorter
only when the trajectory ends within k tokens: then the sum is smaller, as in the reference, which sums over
`min(20, len(tokens))`). Entropies are exact, over the full vocabulary (the reference sums vLLM's top-10).

The driver (`tree_rollout.py`) only gathers entropies and enacts decisions; everything numeric lives here so that
tests can check it against the formulas exactly. Randomness is counter-based: `hashed_uniform(*key)` gives the
same u for the same (seed, prompt, trajectory path, call) whatever order the decisions happen in, so trees do not
depend on thread timing. Pass any `uniform(key) -> float` to `EntropyBrancher` to control it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

RULES = ("threshold", "bernoulli")
REDUCTIONS = ("sum", "mean")


def window_entropy(entropies: Sequence[float], k: int, reduce: str = "sum") -> float:
    """The first `k` per-token entropies (all of them when fewer) summed or averaged; 0.0 for none."""
    head = list(entropies[:k])
    if reduce == "sum":
        return float(sum(head))
    if reduce == "mean":
        return sum(head) / len(head) if head else 0.0
    raise ValueError(f"unknown entropy reduction {reduce!r}; expected one of {REDUCTIONS}")


def entropy_rise(h_t: float, h_init: float, vocab_size: int) -> float:
    """ΔH = (H_t − H_init) / log|V|: the rise normalised by the largest possible entropy."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to normalise entropies, got {vocab_size}")
    return (h_t - h_init) / math.log(vocab_size)


def branch_probability(delta_h: float, alpha: float, beta: float, consecutive: int = 0,
                       penalty_rate: float = 0.0) -> float:
    """P = α + β·ΔH, damped by AEPO's max(0, 1 − rate·consecutive) (rate 0: no penalty). Not clipped."""
    p = alpha + beta * delta_h
    if penalty_rate:
        p *= max(0.0, 1.0 - penalty_rate * consecutive)
    return p


def should_branch(p: float, rule: str, tau: float, u: float | None = None) -> bool:
    """The branching rule: `threshold` → P > τ; `bernoulli` → u < clip(P, 0, 1) (needs u in [0, 1))."""
    if rule == "threshold":
        return p > tau
    if rule == "bernoulli":
        if u is None:
            raise ValueError("rule 'bernoulli' needs a uniform draw u")
        return u < min(max(p, 0.0), 1.0)
    raise ValueError(f"unknown branch rule {rule!r}; expected one of {RULES}")


def dynamic_global_budget(n: int, h_root: float, h_tool: float, budget: int) -> int:
    """AEPO: m = ⌊n·σ(0.5·(H_root − H̄_tool))⌋ + 1 global samples, clipped to [1, budget]."""
    m = math.floor(n / (1.0 + math.exp(-0.5 * (h_root - h_tool)))) + 1
    return max(1, min(m, budget))


def _digest(parts: tuple) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any key parts (stable across runs and processes)."""
    return _digest(parts) & ((1 << 63) - 1)


def hashed_uniform(*parts) -> float:
    """A uniform draw in [0, 1) determined by the key parts (53 bits)."""
    return (_digest(parts) >> 11) / float(1 << 53)


@dataclass
class Decision:
    """One branching decision after one tool result, recorded in the tree's metadata."""
    trajectory: str          # path key of the trajectory that made the call
    call: int                # 1-based index of the tool call within the trajectory
    position: int            # absolute token position right after the result (the fork point)
    h_init: float
    h_t: float
    delta_h: float
    p: float
    u: float | None          # the uniform draw (bernoulli rule only)
    consecutive: int         # branches in a row on this lineage before this decision (AEPO penalty)
    branch: bool             # what the rule says
    children: int = 0        # children actually forked (0 when the budget was spent)

    def to_dict(self) -> dict:
        return asdict(self)


class EntropyBrancher:
    """Turns a trajectory's sampled entropies into a `Decision`, following ARPO.md §2 exactly.

    `sampled` holds the entropies of every token the trajectory sampled so far (prompt and tool results excluded,
    probe tokens included) and `probe` those sampled after the latest result (at most k of them are used).
    """

    def __init__(self, *, alpha: float = 0.5, beta: float = 0.2, tau: float = 0.5, rule: str = "threshold",
                 k: int = 20, vocab_size: int, penalty_rate: float = 0.0, reduce: str = "sum",
                 uniform: Callable[..., float] = hashed_uniform):
        if rule not in RULES:
            raise ValueError(f"unknown branch rule {rule!r}; expected one of {RULES}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown entropy reduction {reduce!r}; expected one of {REDUCTIONS}")
        if k < 1:
            raise ValueError(f"k (probe tokens) must be >= 1, got {k}")
        self.alpha, self.beta, self.tau, self.rule, self.k = alpha, beta, tau, rule, k
        self.vocab_size, self.penalty_rate, self.reduce, self.uniform = vocab_size, penalty_rate, reduce, uniform

    def decide(self, sampled: Sequence[float], probe: Sequence[float], *, key: tuple, trajectory: str, call: int,
               position: int, consecutive: int = 0) -> Decision:
        h_init = window_entropy(sampled, self.k, self.reduce)
        h_t = window_entropy(probe, self.k, self.reduce)
        delta_h = entropy_rise(h_t, h_init, self.vocab_size)
        p = branch_probability(delta_h, self.alpha, self.beta, consecutive, self.penalty_rate)
        u = self.uniform(*key, trajectory, call) if self.rule == "bernoulli" else None
        return Decision(trajectory, call, position, h_init, h_t, delta_h, p, u, consecutive,
                        should_branch(p, self.rule, self.tau, u))
