"""Tree-packed training vs one row per leaf, and the segmented policy-loss kernel vs its PyTorch reference.

Workloads:
- `train`: forward + backward of the policy loss through a Qwen2-shaped model (arpo.model, randomly initialised)
  on ARPO-shaped trees (prompt 256 tokens, M = 16 leaves, N = 8 global samples, 4 segments of 64 tokens per
  leaf, each but the last ending with a 16-token tool result). `reference` = the reference's way: every leaf a
  separate causal row (shared prefixes forwarded once per leaf), naive verl GRPO loss; `packed` = each tree's
  unique tokens once with the ancestor mask, `segmented_policy_loss` from hidden states. Same loss and
  gradient (tests/algo). Tokens forwarded by each are in the case's extra fields.
- `loss`: the loss alone on the packed batch's per-token log-probs (forward + backward): `reference`
  (PyTorch, autograd) vs `triton` (the fused kernel, CUDA only).
Model shapes: CUDA H=1024, 8 layers, V=32768, bf16, 2 (and 8) trees; CPU H=512, 4 layers, V=2048, fp32, one tree
(quick: H=128, 2 layers, V=1024). Packing forwards 3,392 instead of 8,192 tokens per tree; how much of that
shows in time depends on the model's tree attention (a dense [L, L] mask costs more than the per-leaf rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from arpo_kernels._backend import forced_backend

DOC = "policy loss: tree-packed vs duplicated-row training (fwd+bwd), segmented loss kernel vs reference"
BASELINE = "reference"


@dataclass
class Case:
    kind: str  # "train" | "loss"
    trees: int
    hidden: int
    layers: int
    vocab: int
    dtype: torch.dtype
    device: str
    shape: dict = field(default_factory=lambda: dict(prompt_len=256, n_leaves=16, n_global=8, depth=4,
                                                     seg_len=64, result_len=16))

    @property
    def label(self) -> str:
        s = self.shape
        return (f"{self.kind} trees={self.trees} P={s['prompt_len']} M={s['n_leaves']} N={s['n_global']} "
                f"seg={s['seg_len']}x{s['depth']} H={self.hidden} L={self.layers} {str(self.dtype).split('.')[-1]}")

    def make_trees(self):
        from arpo.algo.synthetic import arpo_tree

        return [arpo_tree(i, vocab=self.vocab, **self.shape) for i in range(self.trees)]

    def extra(self) -> dict:
        trees = self.make_trees()
        unique = sum(t.num_unique_tokens() for t in trees)
        dup = sum(t.num_leaf_tokens() for t in trees)
        return {"kind": self.kind, "tokens_packed": unique, "tokens_duplicated": dup,
                "token_ratio": round(dup / unique, 3), "hidden": self.hidden, "layers": self.layers,
                "vocab": self.vocab, **self.shape}


def cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        dt, (H, L, V), trees = torch.bfloat16, (1024, 8, 32768), [2] if quick else [2, 8]
    else:
        dt, (H, L, V), trees = torch.float32, ((128, 2, 1024) if quick else (512, 4, 2048)), [1]
    out = [Case("train", n, H, L, V, dt, device) for n in trees]
    out += [Case("loss", n, H, L, V, dt, device) for n in trees]
    return out


def _model(case: Case):
    from arpo.model import CausalLM, ModelConfig

    heads = max(case.hidden // 64, 2)
    cfg = ModelConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=3 * case.hidden,
                      num_hidden_layers=case.layers, num_attention_heads=heads,
                      num_key_value_heads=max(heads // 4, 1), head_dim=case.hidden // heads)
    torch.manual_seed(0)
    return CausalLM(cfg).to(case.device, case.dtype)


def _packed_train(case: Case):
    if case.kind != "train":
        return None
    from arpo.algo import pack_trees
    from arpo.model import AttentionContext
    from arpo_kernels.policy_loss import segmented_policy_loss_from_hidden

    model, batch = _model(case), pack_trees(case.make_trees()).to(case.device)
    weights = batch.loss_weights("soft", "token-mean")
    ctx = AttentionContext.tree_blocks(*batch.node_blocks())  # block-sparse: cost follows the tree, not T^2

    def run():
        hidden = model(batch.input_ids, batch.position_ids, ctx)
        loss, _ = segmented_policy_loss_from_hidden(hidden, model.lm_head_weight, batch.targets,
                                                    batch.old_logprobs, weights, index=batch.pred_index)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def row_batch(rows, device) -> dict:
    """Leaf rows laid end to end for a varlen forward, with every loss position's (row, column) and targets."""
    lens = rows.lengths
    ids = torch.cat([rows.input_ids[r, : lens[r]] for r in range(len(lens))]).to(device)
    pos = torch.cat([torch.arange(int(n)) for n in lens]).to(device)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)]).to(device)
    # every target position of every row, flattened: (row start + p - 1) predicts (row, p)
    r_idx, p_idx = rows.loss_mask[:, 1:].nonzero(as_tuple=True)
    shape = (len(lens), rows.input_ids.shape[1] - 1)
    mask = torch.zeros(shape)
    mask[r_idx, p_idx] = 1.0
    return {"ids": ids, "pos": pos, "cu": cu, "width": rows.input_ids.shape[1], "shape": shape,
            "pred": (cu[:-1].long().cpu()[r_idx] + p_idx).to(device),
            "targets": rows.input_ids[:, 1:][r_idx, p_idx].to(device),
            "old": rows.old_logprobs[:, 1:][r_idx, p_idx].to(device), "adv": rows.advantages.to(device),
            "r": r_idx.to(device), "p": p_idx.to(device), "mask": mask.to(device)}


def row_loss(model, b: dict, bf16: bool = False) -> torch.Tensor:
    """verl's token-mean dual-clip loss on the rows of `row_batch` (varlen causal forward)."""
    from arpo.algo.rows import grpo_row_loss
    from arpo.model import AttentionContext
    from arpo.trainer.sft import autocast
    from arpo_kernels import linear_logprobs_entropy

    with autocast(b["ids"].device, bf16):
        hidden = model(b["ids"], b["pos"], AttentionContext.varlen(b["cu"], max_seqlen=b["width"]))
    w = model.lm_head_weight
    lp, _ = linear_logprobs_entropy(hidden[b["pred"]].to(w.dtype), w, b["targets"])
    logp = torch.zeros(b["shape"], device=lp.device).index_put((b["r"], b["p"]), lp.float())
    old_rows = torch.zeros_like(logp).index_put((b["r"], b["p"]), b["old"])
    loss, _ = grpo_row_loss(logp, old_rows, b["adv"], b["mask"], "token-mean")
    return loss


def _rows_train(case: Case):
    if case.kind != "train":
        return None
    from arpo.algo import leaf_rows

    model, batch = _model(case), row_batch(leaf_rows(case.make_trees()), case.device)

    def run():
        row_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
    return run


def _loss_inputs(case: Case):
    from arpo.algo import pack_trees

    batch = pack_trees(case.make_trees()).to(case.device)
    g = torch.Generator().manual_seed(0)
    logp = (batch.old_logprobs.cpu() + torch.randn(batch.targets.numel(), generator=g) * 0.3).to(case.device)
    return logp.requires_grad_(), batch.old_logprobs, batch.loss_weights("soft", "token-mean")


def _loss_provider(backend: str | None):
    def make(case: Case):
        if case.kind != "loss" or (backend == "triton" and not case.device.startswith("cuda")):
            return None
        from arpo_kernels import policy_loss

        logp, old, weights = _loss_inputs(case)
        fn = policy_loss.segmented_policy_loss_reference if backend is None else policy_loss.segmented_policy_loss

        def run():
            with forced_backend(backend or "torch"):
                loss, _ = fn(logp, old, weights)
                loss.backward()
                logp.grad = None
        return run
    return make


def providers(device: str) -> dict:
    out = {
        "reference": lambda case: _rows_train(case) if case.kind == "train" else _loss_provider(None)(case),
        "packed": _packed_train,
    }
    if device.startswith("cuda"):
        out["triton"] = _loss_provider("triton")
    return out
