"""Pure tensor functions: each a Triton kernel, its autograd Function and a plain-PyTorch reference.

Nothing here imports from `arpo`. Backend choice: `arpo_kernels.backend_for(tensor)`.
"""
from arpo_kernels._backend import backend_for
from arpo_kernels.linear_token_stats import linear_logprobs_entropy, linear_logprobs_entropy_reference
from arpo_kernels.token_stats import token_logprobs_entropy, token_logprobs_entropy_reference

__all__ = [
    "backend_for",
    "linear_logprobs_entropy",
    "linear_logprobs_entropy_reference",
    "token_logprobs_entropy",
    "token_logprobs_entropy_reference",
]
