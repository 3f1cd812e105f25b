"""The algorithm's settings, declared once: advantages and the clipped policy loss (the `algo` section)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.settings import check_fields, opt


@dataclass
class AlgoConfig:
    """Advantages and the clipped policy loss (ARPO.md §3, §6)."""

    name: Literal["arpo", "grpo"] = opt("arpo", "arpo = tree rollouts + attribution; grpo = independent "
                                        "trajectories (baseline)")
    attribution: Literal["soft", "hard"] = opt(
        "soft", "shared tokens: soft = once per leaf with its advantage; hard = once, with the mean advantage")
    clip_low: float = opt(0.2, "PPO ratio lower clip: 1 - clip_low", ge=0, lt=1)
    clip_high: float = opt(0.2, "PPO ratio upper clip: 1 + clip_high", ge=0)
    dual_clip: Optional[float] = opt(3.0, "dual-clip bound c for negative advantages (> 1); null = off", gt=1)
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = opt(
        "token-mean", "how token losses are averaged into the batch loss")
    kl_coef: float = opt(0.0, "KL penalty to a frozen reference model (> 0 loads one)", ge=0)
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    ppo_epochs: int = opt(1, "passes over each rollout batch", gt=0)
    adv_eps: float = opt(1e-6, "epsilon in (r - mean) / (std + eps)", gt=0)
    aepo_entropy_clip: bool = opt(False, "AEPO entropy-balanced clipping: upper bound (1+eps)/sg(r)*r keeps gradient")
    aepo_entropy_advantage: bool = opt(False, "AEPO entropy-aware advantage: A *= 1 + coef * z(H)")
    aepo_entropy_adv_coef: float = opt(0.2, "AEPO: coef of the entropy z-score in the advantage", ge=0)

    def __post_init__(self):
        self.check()

    def check(self, section: str = "algo") -> "AlgoConfig":
        check_fields(self, section)
        return self


__all__ = ["AlgoConfig"]
