"""Inference engine: paged KV cache bookkeeping (block manager), scheduler, model runner and `LLMEngine`."""
from arpo.engine.block_manager import BACKEND as BLOCK_MANAGER_BACKEND
from arpo.engine.block_manager import BlockManager
from arpo.engine.errors import (
    BlockManagerError,
    DuplicateSequenceError,
    InvalidArgumentError,
    OutOfBlocksError,
    UnknownSequenceError,
)
from arpo.engine.llm_engine import LLMEngine
from arpo.engine.scheduler import CacheTooSmallError
from arpo.engine.sequence import Completion, SamplingParams, StepOutput

__all__ = [
    "BLOCK_MANAGER_BACKEND",
    "BlockManager",
    "BlockManagerError",
    "CacheTooSmallError",
    "Completion",
    "DuplicateSequenceError",
    "InvalidArgumentError",
    "LLMEngine",
    "OutOfBlocksError",
    "SamplingParams",
    "StepOutput",
    "UnknownSequenceError",
]
