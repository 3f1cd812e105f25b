"""The one place that decides which implementation a kernel call runs.

Triton runs when the tensors live on CUDA, or on the CPU when `TRITON_INTERPRET=1` (Triton's numpy interpreter,
used by the tests to prove kernel logic without a GPU). Everywhere else the PyTorch path runs. The environment
variable `ARPO_KERNEL_BACKEND` (`auto` | `triton` | `torch`) overrides the choice; `backend_for(t)` says what a
tensor would get, so the choice is inspectable.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton is a core dependency, but keep importing safe
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    choice = os.environ.get("ARPO_KERNEL_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"ARPO_KERNEL_BACKEND={choice!r}: expected one of {', '.join(BACKENDS)}")
    return choice


def backend_for(tensor: torch.Tensor) -> str:
    """'triton' or 'torch': the implementation a kernel given `tensor` will run."""
    choice = requested_backend()
    can_triton = triton_available() and (tensor.is_cuda or interpreting())
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not can_triton:
            raise RuntimeError(
                "ARPO_KERNEL_BACKEND=triton but Triton cannot run here: tensors must be on CUDA, "
                "or set TRITON_INTERPRET=1 to use the CPU interpreter"
            )
        return "triton"
    return "triton" if can_triton else "torch"


def use_triton(tensor: torch.Tensor) -> bool:
    return backend_for(tensor) == "triton"


def forced_backend(name: str):
    """Run the enclosed kernel calls on `name` ('torch' | 'triton' | 'auto'), restoring the previous choice."""
    return env_override("ARPO_KERNEL_BACKEND", name, BACKENDS, what="backend")


@contextlib.contextmanager
def env_override(var: str, value: str, choices: tuple[str, ...], what: str):
    """Set the environment variable `var` to `value` (one of `choices`, else a ValueError naming `what`) inside
    the block, restoring (or removing) it after."""
    if value not in choices:
        raise ValueError(f"{what} {value!r}: expected one of {', '.join(choices)}")
    prev = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = prev
