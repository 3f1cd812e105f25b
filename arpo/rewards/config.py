"""The reward's settings, declared once: the `reward` section of a run."""
from __future__ import annotations

from dataclasses import dataclass

from arpo.settings import check_fields, check_names, opt


@dataclass
class RewardConfig:
    """How a finished trajectory is scored."""

    name: str = opt("arpo", "built-in reward (arpo, embedded, f1, exact_match) or 'pkg.module:function'")

    def __post_init__(self):
        self.check()

    def check(self, section: str = "reward") -> "RewardConfig":
        from arpo.rewards.reward import BUILTIN_REWARDS

        check_fields(self, section)
        check_names(f"{section}.name", [self.name], BUILTIN_REWARDS)
        return self


__all__ = ["RewardConfig"]
