"""Rewards for ARPO trajectories: format rules, answer comparison, and the reward functions by name."""
from arpo.rewards.answer import exact_match, extract_boxed, math_equal, normalize_answer, token_f1
from arpo.rewards.format import FormatCheck, check_format
from arpo.rewards.reward import (BUILTIN_REWARDS, RewardResult, arpo_reward, embedded_reward, exact_match_reward,
                                 f1_reward, is_math_source, load_reward, score_arpo, score_embedded)

__all__ = ["exact_match", "extract_boxed", "math_equal", "normalize_answer", "token_f1", "FormatCheck",
           "check_format", "BUILTIN_REWARDS", "RewardResult", "arpo_reward", "embedded_reward",
           "exact_match_reward", "f1_reward", "is_math_source", "load_reward", "score_arpo", "score_embedded"]
