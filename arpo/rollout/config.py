"""The rollout's settings, declared once: what `TreeRollout` reads, and the `rollout` section of a run's config.

Defaults are the reference's (../shared/ARPO.md §2): M = 16 leaves, N = 8 global samples, Z = 1 child per
decision, α = 0.5, β = 0.2, τ = 0.5, k = 20 probe tokens, rule `threshold` (the paper's; `bernoulli` is the
reference code's), 3 tool calls, 4096 response tokens. Beyond the algorithm:

- `prefix_mode`: `fork` shares the prompt and every branch prefix through `engine.fork` (no re-prefill);
  `resubmit` is the reference's way — each global sample and each branch is added as a new sequence with its
  full prefix (use an engine with prefix caching off to measure it honestly). Same seeds → same tokens.
- `sync_tools`: True (default) fixes the step at which a result lands: a call made at step s runs while step s+1
  decodes the rest of the batch, and its result is appended right after step s+1 (waiting there if it is not
  back yet; at once when nothing else is left to decode). Which trajectory takes the last unit of budget when M
  is reached then no longer depends on thread timing — what exact resumption of a training run needs. False
  appends each result at the first step after it is ready (more overlap, timing-dependent budget race).
- `mode: auto` (a run's default) is resolved by the run builder (tree for algo.name=arpo, trajectory for
  grpo); `TreeRollout` itself needs `tree` (the default here) or `trajectory`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.settings import ConfigError, check_fields, opt


@dataclass
class RolloutConfig:
    """Entropy-adaptive tree rollout (ARPO.md §2) and sampling."""

    mode: Literal["auto", "tree", "trajectory"] = opt(
        "tree", "tree = ARPO entropy-branching trees; trajectory = independent samples (GRPO baseline); "
        "auto = tree for algo.name=arpo, trajectory for grpo")
    leaves: int = opt(16, "M: trajectories (leaves) per prompt; every prompt yields exactly M", gt=0)
    initial: int = opt(8, "N: global samples started per prompt before branching (<= leaves)", gt=0)
    beam: int = opt(1, "Z: children forked per branching decision", gt=0)
    alpha: float = opt(0.5, "branch probability base: P = alpha + beta * dH", ge=0, le=1)
    beta: float = opt(0.2, "weight of the normalised entropy rise dH in P", ge=0)
    tau: float = opt(0.5, "threshold rule: branch when P > tau", ge=0, le=1)
    probe_tokens: int = opt(20, "k: tokens whose mean entropy gives H_init and H_t", gt=0)
    branch_rule: Literal["threshold", "bernoulli"] = opt(
        "threshold", "threshold = paper (branch iff P > tau); bernoulli = reference code (branch w.p. clip(P, 0, 1))")
    max_tool_calls: int = opt(3, "tool calls per trajectory; later calls are not run", ge=0)
    max_response_tokens: int = opt(4096, "cap on generated + tool-result tokens per trajectory", gt=0)
    temperature: float = opt(1.0, "sampling temperature (0 = greedy, for evaluation; training needs > 0)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling mass (1 = off)", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0 = off)", ge=0)
    aepo_dynamic_budget: bool = opt(False, "AEPO: size the global sample count from a pre-sampled trajectory's "
                                    "root vs tool entropy")
    aepo_branch_penalty: bool = opt(False, "AEPO: damp P after consecutive high-entropy branches")
    aepo_penalty_rate: float = opt(0.05, "AEPO: P *= max(0, 1 - rate * consecutive)", ge=0)
    prefix_mode: Literal["fork", "resubmit"] = opt(
        "fork", "fork = children share the prefix's KV blocks; resubmit = each branch re-sends its whole prefix "
                "(the reference's way, for comparison)")
    sync_tools: bool = opt(True, "append each tool result at a fixed engine step (timing-free, resumable); false "
                                 "= as soon as it is back")
    tool_timeout_s: Optional[float] = opt(None, "deadline per tool call (s); null = the tool executor's", gt=0)
    call_in_prompt: bool = opt(False, "a call's opening tag may lie in the prompt (prompts ending inside a call)")

    def __post_init__(self):
        self.check()

    def check(self, section: str = "rollout") -> "RolloutConfig":
        """Types, bounds and `initial <= leaves`; errors name `section.field`."""
        check_fields(self, section)
        if self.initial > self.leaves:
            raise ConfigError(f"{section}.initial={self.initial} must be <= {section}.leaves={self.leaves}")
        return self


__all__ = ["RolloutConfig"]
