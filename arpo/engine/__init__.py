"""Inference engine: paged KV cache bookkeeping (block manager) and, later, the scheduler and model runner."""
from arpo.engine.block_manager import BACKEND as BLOCK_MANAGER_BACKEND
from arpo.engine.block_manager import BlockManager
from arpo.engine.errors import (
    BlockManagerError,
    DuplicateSequenceError,
    InvalidArgumentError,
    OutOfBlocksError,
    UnknownSequenceError,
)

__all__ = [
    "BLOCK_MANAGER_BACKEND",
    "BlockManager",
    "BlockManagerError",
    "DuplicateSequenceError",
    "InvalidArgumentError",
    "OutOfBlocksError",
    "UnknownSequenceError",
]
