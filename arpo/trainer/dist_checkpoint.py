"""Checkpoints of an FSDP2-sharded run: a sharded DCP copy to resume from, plus one Hugging Face export.

    step_000100/
      dcp/                      torch.distributed.checkpoint: model + AdamW shards, one file per rank, .metadata
      config.json, model.safetensors, tokenizer files   the consolidated policy (rank 0), loads with from_pretrained
      optimizer.pt (scheduler), rng_state.pt, trainer_state.json        as in arpo.trainer.checkpoint

Why both: DCP writes every rank's shards in parallel without gathering them and reloads onto *any* number of
ranks (DCP reshards DTensors on load), which is what resuming with a different world size needs; the HF export is
what people and `arpo eval` load. The export gathers one parameter at a time onto rank 0's CPU
(`gather_full_state_dict`), so no GPU ever holds the full model for it.

`save_step` reuses `arpo.trainer.checkpoint.save_checkpoint` on rank 0 (temporary dir, fsync, rename, keep-last);
the other ranks join inside it for the collective DCP write, so the directory still appears atomically.
Multi-node: `run_dir` must be on a filesystem every node sees. `consolidate_dcp` turns a `dcp/` folder into an
HF directory offline, in one process without a process group.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from arpo.model import CausalLM
from arpo.model.config import ModelConfig
from arpo.trainer import checkpoint as ckpt_lib
from arpo.trainer.distributed import barrier, is_initialized, is_main, rank

DCP_DIR = "dcp"


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable value). Collective; identity in one process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU ({} on the other ranks). Collective on a sharded model."""
    if not is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    return sd if is_main() else {}


def model_from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> CausalLM:
    """A CPU CausalLM whose parameters are the given tensors (no copy)."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.reset("cpu")
    return model


def save_hf(model: nn.Module, path: str, max_shard_size: int | str | None = None,
            dtype: torch.dtype | None = None) -> None:
    """Consolidate the (sharded) policy into a Hugging Face directory at `path`, written by rank 0, in `dtype`
    (default: the master weights' dtype). Collective."""
    state = gather_full_state_dict(model)
    if is_main():
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model_from_state_dict(model.config, state).save_pretrained(path, max_shard_size=max_shard_size)
    barrier()


def _app_state(model: nn.Module, optimizer) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def save_sharded(path: str, model: nn.Module, optimizer=None) -> None:
    """DCP save of the model (and optimizer) shards into `path`. Collective."""
    dcp.save(_app_state(model, optimizer), checkpoint_id=path, no_dist=not is_initialized())


def load_sharded(path: str, model: nn.Module, optimizer=None) -> None:
    """Load a `save_sharded` checkpoint into `model` (and `optimizer`), whatever the number of ranks that wrote
    it and that read it now (sharded or a plain single-process model). Collective."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (.metadata missing)")
    state = _app_state(model, optimizer)
    dcp.load(state, checkpoint_id=path, no_dist=not is_initialized())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_step(run_dir: str, step: int, model: nn.Module, optimizer=None, *, scheduler=None, save_tokenizer=None,
              state: dict | None = None, keep_last: int = 0, hf_dtype: torch.dtype | None = None) -> str:
    """One checkpoint directory (layout in the module docstring); every rank calls it, returns its path.
    `hf_dtype`: the export's dtype (e.g. bf16 for a bf16 policy with fp32 master shards: half the disk)."""
    def collective_part(tmp: str) -> None:
        save_sharded(os.path.join(tmp, DCP_DIR), model, optimizer)
        save_hf(model, tmp, dtype=hf_dtype)

    def write(tmp: str) -> None:  # rank 0, inside save_checkpoint: tell the others where, then write together
        broadcast_object(tmp)
        collective_part(tmp)

    if is_main():
        path = ckpt_lib.save_checkpoint(run_dir, step, save_model=write, save_tokenizer=save_tokenizer,
                                        scheduler=scheduler, state=state, keep_last=keep_last)
    else:
        collective_part(broadcast_object(None))
        path = None
    return broadcast_object(path)


def load_step(path: str, model: nn.Module, optimizer=None) -> ckpt_lib.Checkpoint:
    """Restore model + optimizer shards from a `save_step` directory; returns its trainer state (scheduler,
    rank 0's RNG states, step) for the caller as `load_checkpoint` does."""
    load_sharded(os.path.join(path, DCP_DIR), model, optimizer)
    return ckpt_lib.load_checkpoint(path)


def has_sharded(path: str) -> bool:
    """Whether checkpoint directory `path` holds DCP shards (written by a `save_step` of a distributed run)."""
    return os.path.isfile(os.path.join(path, DCP_DIR, ".metadata"))


def trainable_names(model: nn.Module) -> list[str]:
    """Parameter names in the order `build_optimizer` hands the parameters to the optimiser."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_full_optimizer(model: nn.Module, optimizer, state: dict) -> None:
    """Load a single-process optimiser state dict (parameters numbered in `trainable_names` order, as
    `optimizer.state_dict()` writes them) into the optimiser of a sharded `model`: each rank keeps its shards.
    The fp32 master weights of a `MasterWeightAdamW` state must have been loaded into the model already."""
    names = trainable_names(model)
    state = {k: v for k, v in state.items() if k != "master_params"}
    fqn = {"state": {names[i]: st for i, st in state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, fqn, options=StateDictOptions(full_state_dict=True))


def load_sharded_into_master_weights(dcp_path: str, hf_path: str, optimizer) -> None:
    """Resume a distributed run's shards in one process whose bf16 policy trains with `MasterWeightAdamW`: load
    them into a plain fp32 twin (model `hf_path`) + AdamW, then hand weights and moments to the optimiser, which
    writes the fp32 masters back into the model."""
    twin = CausalLM.from_pretrained(hf_path, dtype=torch.float32, device="cpu")
    plain = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad])
    load_sharded(dcp_path, twin, plain)
    state = plain.state_dict()  # hyper-parameters (the lr of the step) included
    state["master_params"] = [p.detach() for p in twin.parameters() if p.requires_grad]
    optimizer.load_state_dict(state)


def consolidate_dcp(dcp_path: str, config_path: str, out_dir: str, dtype: torch.dtype | None = None) -> None:
    """Offline: a DCP folder (+ the config.json of the model it holds) → an HF directory. One process, CPU."""
    if is_initialized() and rank() != 0:
        return
    config = ModelConfig.from_file(config_path)
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device="cpu")
    model.rotary.reset("cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=dcp_path, no_dist=True)
    model.load_state_dict(state["model"])
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
