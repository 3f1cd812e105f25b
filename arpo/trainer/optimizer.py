"""The optimiser and learning-rate schedule of the RL loop: AdamW, linear warm-up, then constant or cosine.

The scheduler steps once per training step (one rollout batch), so every mini-batch of a step uses the same lr;
its state (a step counter) goes into the checkpoint with the optimiser's.

Low-precision parameters (bf16 on a GPU, so that the engine decodes in bf16 from the very tensors the trainer
updates) get fp32 *master weights*: an lr-1e-6 step is far below bf16's resolution (~4e-3 relative), so plain
AdamW on bf16 tensors would round most updates away. `MasterWeightAdamW` keeps an fp32 copy of each parameter,
steps AdamW on the copies, and writes them back into the model's tensors in place — the engine still shares them.
"""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of optim.lr for the 0-based training step `step`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 copies of (bf16/fp16) model parameters, written back in place after every step."""

    def __init__(self, params, **kw):
        self.model_params = list(params)
        masters = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
        super().__init__(masters, **kw)

    @property
    def masters(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.model_params, self.masters):
            m.grad = None if p.grad is None else p.grad.detach().float()
        loss = super().step(closure)
        for p, m in zip(self.model_params, self.masters):
            p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        super().zero_grad(set_to_none)

    def state_dict(self):
        sd = super().state_dict()
        sd["master_params"] = [m.detach().clone() for m in self.masters]
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_params", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            for p, m, saved in zip(self.model_params, self.masters, masters):
                m.copy_(saved)
                p.copy_(saved)


def build_optimizer(model, optim_section, total_steps: int):
    o = optim_section
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if any(p.dtype != torch.float32 for p in params):
        opt = MasterWeightAdamW(params, **kw)
    else:
        opt = torch.optim.AdamW(params, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, total_steps, o.schedule, o.min_lr_ratio))
    return opt, sched
