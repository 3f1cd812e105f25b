"""Test-wide settings.

Without CUDA, Triton kernels run in Triton's CPU interpreter; this must be set before any kernel module is
imported. The default backend on the CPU stays PyTorch so that model and engine tests run at PyTorch speed;
kernel tests request the Triton path explicitly through the `backend` fixture.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ARPO_KERNEL_BACKEND", "torch")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    """Run a test once per kernel implementation (PyTorch reference path and Triton)."""
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
