"""Exceptions of the KV block manager, shared by the C++ (`arpo._C`) and the pure-Python twin.

The C++ extension imports this module when it loads and raises these very classes, so callers catch one set of
types whichever twin runs. Every class derives from `BlockManagerError`; each also derives from the builtin a
caller would expect (`RuntimeError` for running out of blocks, `KeyError` for an unknown id, `ValueError` for bad
arguments), so `except ValueError` and friends keep working.
"""


class BlockManagerError(Exception):
    """Base class of every block-manager error."""


class OutOfBlocksError(BlockManagerError, RuntimeError):
    """Not enough free blocks for the operation; the manager's state is unchanged."""


class UnknownSequenceError(BlockManagerError, KeyError):
    """The sequence id was never allocated, or was already freed (a double free lands here)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class DuplicateSequenceError(BlockManagerError, ValueError):
    """`allocate` or `fork` was given a sequence id that is already live."""


class InvalidArgumentError(BlockManagerError, ValueError):
    """A size, count, position or block id is out of range."""


__all__ = [
    "BlockManagerError",
    "OutOfBlocksError",
    "UnknownSequenceError",
    "DuplicateSequenceError",
    "InvalidArgumentError",
]
