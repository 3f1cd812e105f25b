"""Entropy-adaptive tree rollout: the tree data types (`tree.py`) and the rollout that builds them."""
from arpo.rollout.branching import Decision, EntropyBrancher
from arpo.rollout.config import RolloutConfig
from arpo.rollout.prompts import PromptInput
from arpo.rollout.tree import ROOT, Leaf, RolloutTree, Segment
from arpo.rollout.tree_rollout import RolloutResult, TreeRollout

__all__ = ["ROOT", "Leaf", "RolloutTree", "Segment", "Decision", "EntropyBrancher", "RolloutConfig",
           "PromptInput", "RolloutResult", "TreeRollout"]
