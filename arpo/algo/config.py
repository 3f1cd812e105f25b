"""The algorithm's settings, declared once: advantages and the clipped policy loss (the `algo` section)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.settings import ConfigError, check_fields, opt

CLIP_HIGH = 0.2
DAPO_CLIP_HIGH = 0.28  # DAPO's clip-higher


@dataclass
class AlgoConfig:
    """Advantages and the clipped policy loss (ARPO.md §3, §6)."""

    name: Literal["arpo", "grpo", "dapo"] = opt(
        "arpo", "arpo = tree rollouts + attribution; grpo = independent trajectories (baseline); dapo = grpo + "
        "clip-higher, dynamic sampling, token-mean, overlong penalty (arpo/algo/dapo.py)")
    attribution: Literal["soft", "hard"] = opt(
        "soft", "shared tokens: soft = once per leaf with its advantage; hard = once, with the mean advantage")
    clip_low: float = opt(0.2, "PPO ratio lower clip: 1 - clip_low", ge=0, lt=1)
    clip_high: Optional[float] = opt(None, "PPO ratio upper clip: 1 + clip_high; null = 0.2, or 0.28 under "
                                     "algo=dapo (clip-higher)", ge=0)
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
    dapo_resample_rounds: int = opt(3, "dapo: extra rollout rounds a step may run to replace the prompts whose "
                                    "leaves all got the same reward (dropped); 0 = drop only", ge=0)
    dapo_overlong_buffer: float = opt(0.2, "dapo: soft overlong penalty buffer, as a fraction of "
                                      "rollout.max_response_tokens (the paper: 4096 of 20480); 0 = off", ge=0, le=1)
    dapo_overlong_penalty: float = opt(1.0, "dapo: the penalty at rollout.max_response_tokens (ramping from 0 at "
                                       "the buffer's start)", ge=0)

    def __post_init__(self):
        self.check()

    def check(self, section: str = "algo") -> "AlgoConfig":
        check_fields(self, section)
        if self.name == "dapo" and self.aggregation != "token-mean":
            raise ConfigError(f"{section}.aggregation={self.aggregation!r}: algo=dapo's loss is token-mean")
        return self

    def upper_clip(self) -> float:
        """clip_high as set, else the algorithm's: 0.28 for DAPO (clip-higher), 0.2 otherwise."""
        if self.clip_high is not None:
            return self.clip_high
        return DAPO_CLIP_HIGH if self.name == "dapo" else CLIP_HIGH


__all__ = ["AlgoConfig"]
