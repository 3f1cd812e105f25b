"""Algorithm primitives on rollout trees: advantages (soft / hard attribution), tree packing, per-leaf rows."""
from arpo.algo.advantages import AGGREGATIONS, MODES, group_advantages
from arpo.algo.packing import PackedBatch, pack_trees
from arpo.algo.rows import LeafRows, leaf_rows

__all__ = ["AGGREGATIONS", "MODES", "LeafRows", "PackedBatch", "group_advantages", "leaf_rows", "pack_trees"]
