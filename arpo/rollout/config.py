"""Settings of one rollout run; field names match `arpo.config.RolloutSection` so the trainer maps them 1:1.

Defaults are the reference's (../shared/ARPO.md §2): M = 16 leaves, N = 8 global samples, Z = 1 child per
decision, α = 0.5, β = 0.2, τ = 0.5, k = 20 probe tokens whose entropies are summed (`entropy_reduce: sum`, the
reference code's and the paper's; `mean` makes ΔH about 1/k as large), rule `threshold` (the paper's; `bernoulli`
is the reference code's), 3 tool calls, a call past them ends the trajectory (`over_limit: end`, the reference's
EOS; `text` lets generation go on with the tags as plain text), 4096 response tokens. The extra fields are the
driver's own:

- `prefix_mode`: `fork` shares the prompt and every branch prefix through `engine.fork` (no re-prefill);
  `resubmit` is the reference's way — each global sample and each branch is added as a new sequence with its
  full prefix (use an engine with prefix caching off to measure it honestly). Same seeds → same tokens.
- `sync_tools`: False (default) runs tool calls on the executor's pool while the batch keeps decoding and appends
  each result at the first step after it is ready. True fixes the step instead: a call made at step s runs while
  step s+1 decodes the rest of the batch, and its result is appended right after step s+1 (waiting there if it
  is not back yet; at once when nothing else is left to decode). The step at which a result lands — and so which
  trajectory takes the last unit of budget when M is reached — then no longer depends on thread timing.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from arpo.rollout.branching import REDUCTIONS, RULES

MODES = ("tree", "trajectory")
OVER_LIMIT = ("end", "text")
PREFIX_MODES = ("fork", "resubmit")


@dataclass
class RolloutConfig:
    mode: str = "tree"                 # tree = ARPO; trajectory = M independent samples (GRPO baseline)
    leaves: int = 16                   # M: leaves per prompt, exactly
    initial: int = 8                   # N: global samples started per prompt
    beam: int = 1                      # Z: children forked per positive decision
    alpha: float = 0.5
    beta: float = 0.2
    tau: float = 0.5
    probe_tokens: int = 20             # k
    branch_rule: str = "threshold"     # threshold | bernoulli
    entropy_reduce: str = "sum"        # sum | mean of the k per-token entropies (H_init and H_t alike)
    max_tool_calls: int = 3
    over_limit: str = "end"            # a call past max_tool_calls: end = the trajectory ends there (no answer);
                                       # text = its tags are plain text, generation goes on, nothing runs
    max_response_tokens: int = 4096    # sampled + tool-result tokens per trajectory
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    aepo_dynamic_budget: bool = False  # AEPO: global sample count from a pre-sampled trajectory's entropies
    aepo_branch_penalty: bool = False  # AEPO: P *= max(0, 1 - rate * consecutive branches)
    aepo_penalty_rate: float = 0.05
    seed: int = 0
    prefix_mode: str = "fork"
    sync_tools: bool = False
    tool_timeout_s: float | None = None  # deadline per call; None = the executor's timeout_s (None there: none)
    call_in_prompt: bool = False       # a call's opening tag may lie in the prompt (prompts ending inside a call)

    def __post_init__(self):
        def bad(name, why):
            return ValueError(f"RolloutConfig.{name}={getattr(self, name)!r}: {why}")

        if self.mode not in MODES:
            raise bad("mode", f"expected one of {MODES}")
        if self.branch_rule not in RULES:
            raise bad("branch_rule", f"expected one of {RULES}")
        if self.entropy_reduce not in REDUCTIONS:
            raise bad("entropy_reduce", f"expected one of {REDUCTIONS}")
        if self.over_limit not in OVER_LIMIT:
            raise bad("over_limit", f"expected one of {OVER_LIMIT}")
        if self.prefix_mode not in PREFIX_MODES:
            raise bad("prefix_mode", f"expected one of {PREFIX_MODES}")
        for name in ("leaves", "initial", "beam", "probe_tokens", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.initial > self.leaves:
            raise bad("initial", f"must be <= leaves={self.leaves}")
        if self.max_tool_calls < 0:
            raise bad("max_tool_calls", "must be >= 0")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0 or self.aepo_penalty_rate < 0:
            raise bad("top_k" if self.top_k < 0 else "aepo_penalty_rate", "must be >= 0")
        if self.tool_timeout_s is not None and self.tool_timeout_s <= 0:
            raise bad("tool_timeout_s", "must be > 0 or None")

    @classmethod
    def from_section(cls, section, **overrides) -> "RolloutConfig":
        """From `arpo.config.RolloutSection` (mode `auto` must be resolved by the caller, e.g. cfg.rollout_mode)."""
        names = {f.name for f in fields(cls)}
        values = {f.name: getattr(section, f.name) for f in fields(section) if f.name in names}
        values.update(overrides)
        return cls(**values)
