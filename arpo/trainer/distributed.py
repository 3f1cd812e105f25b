"""Data-parallel ARPO on PyTorch's own stack: torchrun processes, FSDP2 sharding, exact global-batch gradients.

    torchrun --nproc_per_node=8 -m arpo train config.yaml           # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m arpo train ...

Every rank runs the same step loop on its own shard of the prompts (`shard_prompts`: strided, so that rank r's
local mini-batch j is its part of the global mini-batch j, and a prompt's group of leaves never leaves its rank).
The policy is sharded with FSDP2 (`shard_model`: `fully_shard` per decoder layer, then the root), the rollout
engine reads the gathered weights inside `full_parameters(model)`, and the update follows these rules:

* **Loss normalisation.** The single-process loss is Σ_t c_t·f(r_t) with c_t normalised over the *whole*
  mini-batch: 1/Σ leaf lengths (token-mean, soft), 1/unique loss tokens (token-mean, hard), 1/M leaves (both
  seq-mean aggregations). Advantages are per group, hence per rank. So each rank's loss uses the same formula
  with the *global* normaliser (`global_loss_weights`) and the gradients are *summed* across ranks
  (`shard_model` sets FSDP2's gradient divide factor to 1): Σ_ranks ∇loss_rank = ∇(single-process loss), exactly.
  Only AEPO's entropy z-score (`entropy_adv_coef`) stays local: it is per micro-batch in one process too.
* **Same collectives on every rank.** FSDP2 all-gathers in every forward and reduce-scatters in every backward,
  so every rank must run the same number of micro-steps per optimiser step (`max_across_ranks(len(micro))`,
  padding with `idle_micro_step`) and skip a mini-batch only if all ranks do (`sum_across_ranks`).
* **Metrics** are reduced with `all_reduce_metrics` (count-weighted means, sums, maxima); only `is_main()`
  writes logs and checkpoints (the DCP save itself is collective: see `arpo.trainer.dist_checkpoint`).

Outside torchrun (no WORLD_SIZE in the environment) every helper but `shard_model` is a no-op or an identity, so
the single-process trainer can call them unconditionally; guard `shard_model` with `is_initialized()`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from arpo_kernels.policy_loss import PolicyLossWeights

try:  # FSDP2; absent from some builds (no distributed support)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    HAS_FSDP2 = dist.is_available()
except ImportError:  # pragma: no cover - depends on the torch build
    FSDPModule = MixedPrecisionPolicy = fully_shard = None
    HAS_FSDP2 = False


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the one rank that logs, plots and writes the Hugging Face export."""
    return rank() == 0


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU. Without WORLD_SIZE: one process, no group.
    `device`: "cuda" / "cpu" to force one; default CUDA when available. Idempotent.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "WORLD_SIZE" not in os.environ and not is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_available():
        raise RuntimeError("launched under torchrun but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend())


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def torchrun_argv(nproc: int, args: list[str], *, nnodes: int = 1, rdzv_endpoint: str | None = None,
                  rdzv_id: str = "arpo", module: str = "arpo") -> list[str]:
    """The command `arpo train --nproc N ...` re-executes itself as: python -m torch.distributed.run ... -m arpo
    ARGS. One node: a private local rendezvous (--standalone); several: c10d at `rdzv_endpoint` (HOST:PORT)."""
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc and nnodes must be >= 1, got nproc={nproc}, nnodes={nnodes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("a multi-node launch needs rdzv_endpoint=HOST:PORT (the same on every node)")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}",
                f"--rdzv_id={rdzv_id}"]
    return cmd + ["-m", module, *args]


# ------------------------------------------------------------------------------------------------ batch split
def local_batch_sizes(batch_prompts: int, mini_batch_prompts: int, world: int | None = None) -> tuple[int, int]:
    """(prompts per rank per step, prompts per rank per mini-batch); both must divide evenly so that every rank
    runs the same number of optimiser steps and mini-batch j is the same prompts as in one process."""
    world = world_size() if world is None else world
    for name, n in (("train.batch_prompts", batch_prompts), ("train.mini_batch_prompts", mini_batch_prompts)):
        if n % world:
            raise ValueError(f"{name}={n} is not divisible by the number of ranks ({world}); "
                             f"use a multiple of {world}")
    return batch_prompts // world, mini_batch_prompts // world


def shard_prompts(prompts: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's prompts: every world-th one from `rank_` (whole prompts, so a group never spans ranks).

    Strided rather than contiguous: the local mini-batch j (`mini_batch_prompts / world` consecutive local
    prompts) of all ranks together is exactly the global mini-batch j (`mini_batch_prompts` consecutive prompts).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} out of range for world size {world}")
    if len(prompts) % world:
        raise ValueError(f"{len(prompts)} prompts cannot be split evenly over {world} ranks")
    return list(prompts[rank_::world])


# ------------------------------------------------------------------------------------------------ sharding
def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
                mesh=None) -> nn.Module:
    """FSDP2 in place: `fully_shard` each of `model.layers`, then the root (embeddings, final norm, lm_head).

    Layers free their gathered weights after forward (ZeRO-3) unless `reshard_after_forward=False` (ZeRO-2:
    more memory, one all-gather less per layer in backward). The root keeps its gathered weights after forward,
    because the trainer reads `model.lm_head_weight` *after* the forward (fused log-prob kernel). `param_dtype`
    (e.g. bf16) is FSDP2's mixed precision — gather and compute in it, master weights stay fp32; leave it None
    with torch.autocast. Gradients are summed, not averaged, across ranks (see the module docstring).
    """
    if not HAS_FSDP2:
        raise RuntimeError("FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch build")
    if not is_initialized():
        raise RuntimeError("shard_model needs a process group: call init_distributed() under torchrun first")
    # cast_forward_inputs off: the model casts its own activations, and the engine's AttentionContext (KV caches)
    # must reach the layers as the very tensors it owns
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    kw = {"mp_policy": mp, "mesh": mesh if mesh is not None else _group_mesh()}
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    for m in fsdp_modules(model):  # reduce-scatter with a plain SUM (no AVG / PREMUL_SUM: gloo has neither)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    model._arpo_layer_reshard = reshard_after_forward
    return model


def _group_mesh():
    """A 1-D mesh over every rank, on the process group's own device type.

    FSDP2's default mesh takes CUDA whenever CUDA is visible, so a gloo (CPU) job on a machine with fewer GPUs
    than ranks failed in `cuda.set_device(local_rank)`."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (dist.get_world_size(),))


def fsdp_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if HAS_FSDP2 and isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return HAS_FSDP2 and isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_parameters(model: nn.Module):
    """Gather every shard once and keep the full weights until exit, e.g. around the rollout.

    Inside, the module's parameters *are* the gathered tensors (FSDP2 swaps them in), so the engine, which reads
    `model.layers[i]...weight` at call time, decodes with them; no copy beyond the gathered one is made. On exit
    they are freed and the shards swapped back. Memory: + one full copy of the weights in the gather dtype
    (param_dtype, else the master dtype) for the duration — the alternative, gathering layer by layer inside
    every decode step, needs no extra memory but moves all the weights over the network once per decoded token.
    CUDA graphs captured inside hold the gathered storage's addresses: capture them anew in each rollout.
    No-op for an unsharded model.
    """
    mods = fsdp_modules(model)
    if not mods:
        yield model
        return
    layer_reshard = getattr(model, "_arpo_layer_reshard", True)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    handles = [m.unshard(async_op=True) for m in mods]
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(layer_reshard if m is not model else False, recurse=False)


# ------------------------------------------------------------------------------------------------ the update
def global_normaliser(batch, mode: str, aggregation: str) -> float:
    """What `batch.loss_weights(mode, aggregation)` divides by, for this rank's part of the mini-batch."""
    if aggregation == "token-mean":
        n = batch.targets.numel() if mode == "hard" else int(batch.leaf_lengths.sum())
    else:
        n = batch.leaf_lengths.numel()
    return float(max(n, 1))


def global_loss_weights(batch, mode: str = "soft", aggregation: str = "token-mean") -> PolicyLossWeights:
    """`batch.loss_weights(mode, aggregation)` renormalised over the global mini-batch (all ranks' parts).

    Every aggregation's coefficient is local-normaliser-dependent only through one scalar (see
    `global_normaliser`), so rescaling pos / neg / weight by local / global gives the global coefficients; the
    counts (metric weights) are per token and stay as they are. Collective: every rank must call it.
    """
    w = batch.loss_weights(mode, aggregation)
    if world_size() == 1:
        return w
    local = global_normaliser(batch, mode, aggregation)
    total = sum_across_ranks([local])[0]
    s = local / total
    return PolicyLossWeights(w.pos * s, w.neg * s, w.weight * s, w.count, w.count_pos, w.count_neg)


def idle_micro_step(model: nn.Module, ref_model: nn.Module | None = None) -> None:
    """A forward + backward that changes no gradient but runs the collectives of a real micro-step (for a rank
    with fewer micro-batches than the others). Touches every parameter, as FSDP2 reduce-scatters only those
    with a gradient and the ranks' sets must agree; forwards the (sharded) reference model too when the real
    micro-steps do."""
    dev = model.device
    ids = torch.zeros(1, dtype=torch.long, device=dev)
    if ref_model is not None:
        with torch.no_grad():
            ref_model(ids, ids)
    hidden = model(ids, ids)
    zero = hidden.sum() * 0.0 + model.lm_head_weight.sum() * 0.0
    zero.backward()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient norm over all shards (clipped to `max_norm`, inf = measure only), as a float."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


# ------------------------------------------------------------------------------------------------ reductions
def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(values: list[float], op: str) -> list[float]:
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over ranks (fp64). Collective; identity in one process."""
    return _reduce(values, "sum")


def max_across_ranks(value: float) -> float:
    """The largest `value` of any rank, e.g. the number of micro-batches all ranks must run. Collective."""
    return _reduce([value], "max")[0]


def all_reduce_metrics(metrics: dict, weight: float = 1.0, sums: tuple[str, ...] = (),
                       maxes: tuple[str, ...] = ()) -> dict:
    """Global metrics from per-rank ones: keys in `sums` are added, keys in `maxes` take the maximum, the others
    become the `weight`-weighted mean over ranks (weight = e.g. the rank's leaves or loss tokens; 1 = plain
    mean). Every rank must pass the same keys in the same order; non-numeric values are kept from this rank."""
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if world_size() == 1 or not keys:
        return dict(metrics)
    mean_keys = [k for k in keys if k not in sums and k not in maxes]
    summed = sum_across_ranks([weight] + [metrics[k] * weight for k in mean_keys]
                              + [metrics[k] for k in keys if k in sums])
    total = summed[0]
    out = dict(metrics)
    for i, k in enumerate(mean_keys):
        out[k] = summed[1 + i] / total if total else 0.0
    for i, k in enumerate([k for k in keys if k in sums]):
        out[k] = summed[1 + len(mean_keys) + i]
    max_keys = [k for k in keys if k in maxes]
    if max_keys:
        for k, v in zip(max_keys, _reduce([metrics[k] for k in max_keys], "max")):
            out[k] = v
    return out
