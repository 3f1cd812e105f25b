"""Pure tensor functions: each a Triton kernel, its autograd Function and a plain-PyTorch reference.

Nothing here imports from `arpo`. Backend choice: `arpo_kernels.backend_for(tensor)`.
"""
from arpo_kernels._backend import backend_for
from arpo_kernels.fused_ops import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    rotary_qk,
    rotary_reference,
    silu_mul,
    silu_mul_reference,
)
from arpo_kernels.kv_cache import copy_blocks, copy_blocks_reference, gather_kv, store_kv, store_kv_reference
from arpo_kernels.linear_token_loss import linear_token_loss
from arpo_kernels.linear_token_stats import linear_logprobs_entropy, linear_logprobs_entropy_reference
from arpo_kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)
from arpo_kernels.policy_loss import (
    PolicyLossWeights,
    segmented_policy_loss,
    segmented_policy_loss_from_hidden,
    segmented_policy_loss_reference,
)
from arpo_kernels.sampler import sample, sample_reference
from arpo_kernels.token_stats import token_logprobs_entropy, token_logprobs_entropy_reference

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "backend_for",
    "copy_blocks",
    "copy_blocks_reference",
    "gather_kv",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "PolicyLossWeights",
    "rms_norm",
    "rms_norm_reference",
    "rotary_qk",
    "rotary_reference",
    "sample",
    "segmented_policy_loss",
    "segmented_policy_loss_from_hidden",
    "segmented_policy_loss_reference",
    "sample_reference",
    "silu_mul",
    "silu_mul_reference",
    "store_kv",
    "store_kv_reference",
    "linear_logprobs_entropy",
    "linear_logprobs_entropy_reference",
    "linear_token_loss",
    "token_logprobs_entropy",
    "token_logprobs_entropy_reference",
]
