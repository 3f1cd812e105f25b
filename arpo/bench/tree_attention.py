"""Tree attention, forward + backward: the interval kernel vs block-sparse SDPA vs SDPA with the dense mask.

Why: the trainer's attention over a tree-packed micro-batch. `dense-mask` (baseline) is SDPA with the bool [T, T]
ancestor mask (`AttentionContext.tree`); `tree-blocks` per-node SDPA over each node's path (`tree_blocks`, the
CPU trainer); `tree-kernel` the Triton kernel over the interval arrays (`arpo_kernels.tree_attention`, the CUDA
trainer; on the CPU only under TRITON_INTERPRET=1, which proves logic, not speed). Each call builds its index
(mask / blocks / intervals) from the packed batch, then runs forward and backward of q, k, v.

Shapes: CUDA — Qwen2.5-3B heads (16 / 2 KV, D 128, bf16) over an M 16 fan (1k prompt, 16 × 1k responses: 17k
tokens) and an ARPO-shaped tree of the same leaves (N 8, 4 segments of 256); CPU — 4 / 2 heads, D 32, fp32, a
~1k and a ~4k tree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DOC = "tree attention fwd+bwd: interval kernel vs block-sparse SDPA vs dense-mask SDPA"
BASELINE = "dense-mask"
REPS = (1, 3)


@dataclass
class Case:
    name: str
    trees: list
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str

    @property
    def label(self) -> str:
        return f"tree-attn {self.name} Hq={self.heads} Hkv={self.kv_heads} D={self.head_dim} {str(self.dtype)[6:]}"

    def extra(self) -> dict:
        return {"tokens": sum(t.num_unique_tokens() for t in self.trees)}


def cases(device: str, quick: bool) -> list[Case]:
    from arpo.algo.synthetic import arpo_tree

    if device.startswith("cuda"):
        fan = [arpo_tree(0, prompt_len=1024, n_leaves=16, n_global=16, depth=1, seg_len=1024)]
        arpo = [arpo_tree(1, prompt_len=1024, n_leaves=16, n_global=8, depth=4, seg_len=256, result_len=32)]
        out = [Case("fan 1k+16x1k", fan, 16, 2, 128, torch.bfloat16, device),
               Case("arpo M16 N8 4x256", arpo, 16, 2, 128, torch.bfloat16, device)]
        return out[:1] if quick else out
    small = [arpo_tree(0, vocab=100, prompt_len=128, n_leaves=8, n_global=4, depth=3, seg_len=48, result_len=8)]
    big = [arpo_tree(s, vocab=100, prompt_len=256, n_leaves=16, n_global=8, depth=3, seg_len=48, result_len=8)
           for s in range(2)]
    out = [Case("~1k", small, 4, 2, 32, torch.float32, device), Case("~4k", big, 4, 2, 32, torch.float32, device)]
    return out[:1] if quick else out


def _inputs(case: Case):
    from arpo.algo import pack_trees

    batch = pack_trees(case.trees).to(case.device)
    t = batch.num_tokens
    g = torch.Generator(device=case.device).manual_seed(0)

    def make(h):
        return torch.randn(t, h, case.head_dim, generator=g, device=case.device).to(case.dtype).requires_grad_()
    return batch, make(case.heads), make(case.kv_heads), make(case.kv_heads)


def _provider(kind: str):
    def make(case: Case):
        from arpo_kernels._backend import interpreting

        if kind == "kernel" and not (case.device.startswith("cuda") or interpreting()):
            return None
        from arpo.model import AttentionContext
        from arpo.model.attention import block_attention, masked_attention
        from arpo_kernels._backend import forced_backend
        from arpo_kernels.tree_attention import tree_attention

        batch, q, k, v = _inputs(case)
        scale = case.head_dim ** -0.5
        do = torch.randn_like(q)

        def run():
            if kind == "dense":
                out = masked_attention(q, k, v, batch.attention_mask(), scale)
            elif kind == "blocks":
                out = block_attention(q, k, v, AttentionContext.tree_blocks(*batch.node_blocks()), scale)
            else:
                with forced_backend("triton"):
                    out = tree_attention(q, k, v, *batch.token_intervals(), scale)
            out.backward(do)
            q.grad = k.grad = v.grad = None
        return run
    return make


def providers(device: str) -> dict:
    return {"dense-mask": _provider("dense"), "tree-blocks": _provider("blocks"), "tree-kernel": _provider("kernel")}
