"""The reward's settings, declared once: the `reward` section of a run."""
from __future__ import annotations

from dataclasses import dataclass

from arpo.settings import check_fields, check_names, opt


@dataclass
class RewardConfig:
    """How a finished trajectory is scored."""

    name: str = opt("arpo", "built-in reward (arpo, embedded, f1, exact_match) or 'pkg.module:function'")
    strict_format: bool = opt(False, "arpo: judge the format by the strict block grammar (no nesting, answer last, "
                              "tag text inside code and results is content) instead of the reference's checks")
    math_equivalence: bool = opt(False, "arpo: a math data source's answer scores 1.0 when mathematically equal to "
                                 "the truth (math-verify, else sympy); the reference scores token F1 only")

    def __post_init__(self):
        self.check()

    def check(self, section: str = "reward") -> "RewardConfig":
        from arpo.rewards.reward import BUILTIN_REWARDS

        check_fields(self, section)
        check_names(f"{section}.name", [self.name], BUILTIN_REWARDS)
        return self


__all__ = ["RewardConfig"]
