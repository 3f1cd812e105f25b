"""The public `BlockManager`: the C++ one from `arpo._C` when it is built, else the pure-Python twin.

Both twins behave identically (same tables, slots, copies and exceptions); the C++ one is just faster in the
decode loop. The choice is made once at import; `ARPO_BLOCK_MANAGER=python` forces the twin and
`ARPO_BLOCK_MANAGER=cpp` makes a missing extension an ImportError instead of a silent fallback.
"""
import os

from arpo.engine.block_manager_py import ROOT_HASH, BlockManagerPy, chain_hash
from arpo.engine.errors import (
    BlockManagerError,
    DuplicateSequenceError,
    InvalidArgumentError,
    OutOfBlocksError,
    UnknownSequenceError,
)

_choice = os.environ.get("ARPO_BLOCK_MANAGER", "auto").strip().lower()
if _choice not in ("auto", "cpp", "python"):
    raise ImportError(f"ARPO_BLOCK_MANAGER={_choice!r}: expected one of 'auto', 'cpp', 'python'")

try:
    from arpo._C import BlockManager as BlockManagerCpp
except ImportError:
    if _choice == "cpp":
        raise
    BlockManagerCpp = None

if _choice == "python" or BlockManagerCpp is None:
    BlockManager = BlockManagerPy
    BACKEND = "python"
else:
    BlockManager = BlockManagerCpp
    BACKEND = "cpp"


def check_invariants(bm) -> None:
    """Check a manager's bookkeeping through its public API (tests and debugging); raises AssertionError.

    Every table covers exactly its tokens, holds no block twice, each block's ref count equals the number of
    tables holding it, and the free count equals the number of unreferenced blocks.
    """
    holders = [0] * bm.num_blocks
    for sid in bm.seq_ids():
        table, n = bm.block_table(sid), bm.num_tokens(sid)
        if len(table) != -(-n // bm.block_size):
            raise AssertionError(f"sequence {sid}: {len(table)} blocks for {n} tokens")
        if len(set(table)) != len(table):
            raise AssertionError(f"sequence {sid}: a block appears twice in {table}")
        for b in table:
            holders[b] += 1
    for b, count in enumerate(holders):
        if bm.ref_count(b) != count:
            raise AssertionError(f"block {b}: ref count {bm.ref_count(b)} but held by {count} tables")
    if bm.num_free_blocks != holders.count(0):
        raise AssertionError(f"{bm.num_free_blocks} free blocks but {holders.count(0)} unreferenced")


__all__ = [
    "BACKEND",
    "check_invariants",
    "BlockManager",
    "BlockManagerCpp",
    "BlockManagerPy",
    "ROOT_HASH",
    "chain_hash",
    "BlockManagerError",
    "DuplicateSequenceError",
    "InvalidArgumentError",
    "OutOfBlocksError",
    "UnknownSequenceError",
]
