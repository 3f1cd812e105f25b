"""The ARPO step loop behind `arpo train`: rollout → rewards → advantages → tree-packed update → metrics.

    trainer = Trainer(load_config("arpo/configs/embedded.yaml"))
    summary = trainer.train()      # checkpoints, metrics.jsonl, plots in cfg.train.run_dir

One step (1-based `step`):
1. the prompts of the step (`PromptSampler`, a pure function of (seed, step));
2. `TreeRollout.run` on the engine that holds the policy's own parameters (no copy), tools in the loop, seeded by
   (train.seed, step) — tree rollouts for ARPO, independent trajectories for GRPO (`algo=grpo`) and DAPO
   (`algo=dapo`: prompts whose leaves all got one reward are dropped and more are rolled out, `arpo.algo.dapo`);
3. rewards come with the leaves; `policy_update` packs the trees, normalises advantages per prompt, applies the
   segmented PPO loss (soft or hard attribution) in mini-batches and steps AdamW; the lr scheduler steps;
4. metrics go to metrics.jsonl / TensorBoard / W&B: reward, accuracy (leaves with reward 1), format_ok, entropy
   (sampler, per sampled token), tool_calls_per_leaf, tool_executions_per_leaf (calls actually run: a branch
   forked after a result shares its parent's), branch_rate (branches per tool call), leaves,
   mixed_groups (prompts whose leaves got different rewards — the others give zero advantage), tokens_per_s,
   packed_tokens / packing_saving (tree packing vs one row per leaf), time/rollout, time/tools, time/update,
   loss, grad_norm, lr, update/* (clip fractions, approx_kl, trainer entropy, kl) and logprob_gap/* (sampler vs
   trainer log-probs of the same tokens); held-out eval/* every `train.eval_every` steps, at step 0 (the start
   model) and at the end; checkpoints every `train.save_every` steps and at the end. Under `algo=dapo` the
   rollout numbers cover every prompt rolled out, dropped ones too, and `dapo/*` adds rounds, sampled / dropped /
   kept prompts and the overlong penalty (mean per kept leaf, share of kept leaves penalised).

Determinism: every random choice is seeded from train.seed and the step, tool results are awaited each decode
step, and the checkpoint holds weights, optimiser, scheduler and RNG states — so `--resume` reproduces the
metrics an uninterrupted run would have logged (timings aside).

Data-parallel: under torchrun (`arpo train --nproc N`) every rank runs this loop on its share of each step's
prompts, with the policy sharded by FSDP2 and the rollout decoding on the gathered weights; the update, metrics
and checkpoints follow `arpo.trainer.distributed` / `dist_checkpoint`, and N ranks reproduce one process's run.

Run directory: one run per directory (`arpo.trainer.run_dir`): a fresh run refuses a directory holding an
earlier run unless `overwrite=True` (`--overwrite`), which first removes it; `--resume` skips checkpoints that
fail their manifest. SIGTERM / Ctrl-C finish the step, checkpoint it and stop (`arpo.trainer.signals`).

Cold start: with `sft.steps > 0` and no checkpoint to resume, the start model is first fine-tuned on the
demonstrations (`arpo.trainer.sft`) and saved to RUN_DIR/sft_model, which later runs in that directory reuse.
"""
from __future__ import annotations

import gc
import json
import os
import random
import time

import numpy as np
import torch

from arpo.algo.dapo import apply_overlong_penalty, dynamic_sampling, overlong_buffer_tokens
from arpo.config import check_paths, config_to_dict, config_to_yaml
from arpo.trainer import checkpoint as ckpt_lib
from arpo.trainer import distributed as D
from arpo.build import (base_model_path, build_engine, build_reward, build_rollout, build_tools, load_policy,
                        policy_dtype, set_threads, step_seed)
from arpo.trainer.data import PromptSampler, eval_rows, prompt_inputs, train_rows
from arpo.trainer import dist_checkpoint as dcp_lib
from arpo.trainer.run_dir import check_train_run_dir, on_rank0
from arpo.trainer.signals import StopOnSignal
from arpo.trainer.evaluate import evaluate, is_correct
from arpo.trainer.metrics import MetricsLogger, progress_bar, progress_postfix
from arpo.trainer.optimizer import MasterWeightAdamW, build_optimizer
from arpo.trainer.update import policy_update

SFT_MODEL_DIR = "sft_model"
EXTRA_SEED = 0x5DA90  # offsets train.seed for DAPO's extra rollout rounds (prompt order and sampling)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rollout_metrics(trees: list, stats: dict) -> dict:
    """Per-step numbers about the rollout batch (summed over data-parallel ranks: each holds part of it)."""
    leaves = [l for t in trees for l in t.leaves]
    ent_sum = ent_n = sampled = 0.0
    for t in trees:
        for s in t.segments:
            for e, m in zip(s.entropies, s.loss_mask):
                if m:
                    ent_sum += e
                    ent_n += 1
        sampled += sum(sum(s.loss_mask) for s in t.segments)
    calls = sum(l.tool_calls for l in leaves)
    local = {
        "leaves": len(leaves), "trees": len(trees), "reward": sum(l.reward for l in leaves),
        "correct": sum(is_correct(l.reward) for l in leaves), "format_ok": sum(l.reward > -1.0 for l in leaves),
        "ent_sum": ent_sum, "ent_n": ent_n, "sampled": sampled, "calls": calls,
        "engine_calls": stats.get("tool_calls", calls),
        "branches": sum(int(t.metadata.get("branches", 0)) for t in trees),
        "mixed": sum(len(set(t.rewards())) > 1 for t in trees),
        "response_tokens": sum(len(t.leaf_token_ids(l)) for t in trees for l in t.leaves),
        "unique": sum(t.num_unique_tokens() for t in trees), "leaf_tokens": sum(t.num_leaf_tokens() for t in trees),
    }
    g = dict(zip(local, D.sum_across_ranks(list(local.values()))))
    wall, decode = D.max_across_ranks(stats.get("wall_s", 0.0)), D.max_across_ranks(stats.get("decode_s", 0.0))
    n = max(g["leaves"], 1)
    return {
        "reward": g["reward"] / n,
        "accuracy": g["correct"] / n,
        "format_ok": g["format_ok"] / n,
        "entropy": g["ent_sum"] / max(g["ent_n"], 1),
        "tool_calls_per_leaf": g["calls"] / n,
        "tool_executions_per_leaf": g["engine_calls"] / n,  # calls actually run: a branch shares its parent's
        "branch_rate": g["branches"] / max(g["engine_calls"], 1),
        "leaves": int(g["leaves"]),
        "mixed_groups": g["mixed"] / max(g["trees"], 1),
        "response_tokens": g["response_tokens"] / n,
        "tokens_per_s": g["sampled"] / max(wall, 1e-9),
        "packed_tokens": int(g["unique"]),
        "packing_saving": 1.0 - g["unique"] / max(g["leaf_tokens"], 1),
        "time/rollout": decode,
        "time/tools": max(wall - decode, 0.0),
    }


class Trainer:
    def __init__(self, cfg, *, progress: bool | None = None, echo=print, overwrite: bool = False):
        """`overwrite`: start fresh in a run directory that holds an earlier run, deleting that run first
        (otherwise that is a RunDirInUse error naming --resume, train.run_dir= and --overwrite)."""
        check_paths(cfg)
        self.cfg = cfg
        self.run_dir = cfg.train.run_dir
        # under torchrun: join the job; the policy is sharded with FSDP2 (even on one rank), see `distributed`
        self.dist = D.init_distributed("cpu" if cfg.model.device == "cpu" else None)
        self.sharded = self.dist.backend is not None
        self.main = D.is_main()
        self.echo = echo if self.main else _silent
        self.progress = (cfg.log.progress_bar if progress is None else progress) and self.main
        self.local_prompts, _ = D.local_batch_sizes(cfg.train.batch_prompts, cfg.train.mini_batch_prompts)
        set_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self.resume_path = on_rank0(lambda: self._claim_run_dir(overwrite))  # before any rank writes
        os.makedirs(self.run_dir, exist_ok=True)
        self.start_step = 0
        self.sft_summary: dict | None = None
        ck = None
        if self.resume_path:
            ck = ckpt_lib.load_checkpoint(self.resume_path)
            self.start_step = ck.step
            self.start_model_path = ck.state.get("start_model", self.resume_path)
            masters = (ck.optimizer or {}).get("master_params") if not dcp_lib.has_sharded(self.resume_path) \
                else None
            self.decode_dtype = policy_dtype(self.resume_path, cfg.model)
            self.model, self.tokenizer = self._load(self.resume_path, masters)
        else:  # a cold start is trained by rank 0 alone; the others wait for its directory
            self.start_model_path = self._start_model() if self.main else None
            if self.sharded:
                self.start_model_path = dcp_lib.broadcast_object(self.start_model_path)
            self.decode_dtype = policy_dtype(self.start_model_path, cfg.model)
            if self.sft_summary is None or self.sharded:
                self.model, self.tokenizer = self._load(self.start_model_path)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model, _ = self._load(self.start_model_path)
            self.ref_model.requires_grad_(False).eval()
        self.optimizer, self.lr_scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps)
        if ck is not None:
            self._restore_optimizer(ck)
        self.tools = build_tools(cfg, self.tokenizer)
        self.reward_fn = build_reward(cfg)
        leaves = max(cfg.rollout.leaves, cfg.train.eval_samples)
        self.engine = build_engine(self.model, self.tokenizer, cfg, self.local_prompts * leaves + 64,
                                   sharded=self.sharded, kv_dtype=self.decode_dtype)
        self.rollout = build_rollout(self.engine, self.tools, self.reward_fn, cfg)
        self.train_prompts = prompt_inputs(train_rows(cfg), self.tokenizer, cfg.data, self.tools.protocol)
        self.eval_prompts = prompt_inputs(eval_rows(cfg), self.tokenizer, cfg.data, self.tools.protocol)
        self.prompt_sampler = PromptSampler(self.train_prompts, cfg.train.batch_prompts, cfg.train.seed,
                                            cfg.data.shuffle)
        # DAPO's extra rounds draw from a stream of their own, so the step schedule stays what GRPO's is
        self.extra_sampler = PromptSampler(self.train_prompts, cfg.train.batch_prompts, cfg.train.seed + EXTRA_SEED,
                                           cfg.data.shuffle)
        if ck is not None:
            ck.restore_rng()
        self.model.eval()

    def _claim_run_dir(self, overwrite: bool) -> str | None:
        """The checkpoint to resume (newest valid one; bad ones skipped with a warning), and the run-dir rule."""
        path = ckpt_lib.resolve_resume(self.run_dir, self.cfg.train.resume)
        removed = check_train_run_dir(self.run_dir, resume=self.cfg.train.resume, resuming=path is not None,
                                      overwrite=overwrite)
        if removed:
            self.echo(f"--overwrite: removed the earlier run in {self.run_dir} ({', '.join(removed)})")
        return path

    # --- the policy --------------------------------------------------------------------------------------------
    def _load(self, path: str, masters: list | None = None):
        """(model, tokenizer) from `path`. Sharded runs keep fp32 master shards and gather the weights in the
        configured dtype (FSDP2 mixed precision) — the single-process trainer's MasterWeightAdamW, distributed;
        `masters`: that optimiser's saved fp32 weights, which replace the checkpoint's rounded ones."""
        if not self.sharded:
            return load_policy(path, self.cfg.model)
        model, tokenizer = load_policy(path, self.cfg.model, dtype=torch.float32)
        if masters is not None:
            with torch.no_grad():
                for p, m in zip([p for p in model.parameters() if p.requires_grad], masters):
                    p.copy_(m)
        low = self.decode_dtype if self.decode_dtype != torch.float32 else None
        return D.shard_model(model, param_dtype=low), tokenizer

    def _restore_optimizer(self, ck) -> None:
        """Optimiser and scheduler state of `ck`, whichever kind of run wrote it and whichever reads it."""
        if dcp_lib.has_sharded(self.resume_path):  # a distributed run's shards: any number of ranks, or none
            dcp_dir = os.path.join(self.resume_path, dcp_lib.DCP_DIR)
            if isinstance(self.optimizer, MasterWeightAdamW):
                dcp_lib.load_sharded_into_master_weights(dcp_dir, self.resume_path, self.optimizer)
            else:
                dcp_lib.load_sharded(dcp_dir, self.model, self.optimizer)
        elif ck.optimizer:  # a single-process run's state dict
            if self.sharded:
                dcp_lib.load_full_optimizer(self.model, self.optimizer, ck.optimizer)
            else:
                self.optimizer.load_state_dict(ck.optimizer)
        if ck.scheduler:
            self.lr_scheduler.load_state_dict(ck.scheduler)

    # --- start model ---------------------------------------------------------------------------------------------
    def _start_model(self) -> str:
        """The checkpoint RL starts from: the base model, or its SFT cold start (trained now if missing)."""
        base = base_model_path(self.cfg)
        if self.cfg.sft.steps <= 0:
            return base
        out = os.path.join(self.run_dir, SFT_MODEL_DIR)
        if os.path.isfile(os.path.join(out, "config.json")):
            self.echo(f"cold start: reusing {out}")
            return out
        from arpo.trainer.sft import run_sft

        self.model, self.tokenizer = load_policy(base, self.cfg.model)
        stop, stop_acc = self.cfg.sft.stop_loss, self.cfg.sft.stop_accuracy
        until = ([f"the loss is below {stop:g}"] if stop else []) + (
            [f"greedy decoding reproduces {100 * stop_acc:g}% of the traces"] if stop_acc else [])
        self.echo(f"cold start: up to {self.cfg.sft.steps} SFT steps on the demonstrations"
                  + (f" (until {' or '.join(until)})" if until else ""))
        with MetricsLogger(os.path.join(self.run_dir, "sft")) as logger:
            self.sft_summary = run_sft(self.model, self.tokenizer, self.cfg, logger, progress=self.progress)
        self.echo(f"cold start: {self.sft_summary['steps']} steps, loss {self.sft_summary['loss']:.3f}")
        tmp = f"{out}.tmp-{os.getpid()}"
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
        return out

    # --- one step --------------------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """Training step `step` (1-based): rollout, update, scheduler; returns its metrics."""
        cfg = self.cfg
        self.model.eval()
        trees, metrics = self._rollout(step)
        t0 = time.perf_counter()
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update(policy_update(self.model, trees, cfg, self.optimizer, self.ref_model,
                                     temperature=self.rollout.cfg.temperature))
        self.lr_scheduler.step()
        metrics["time/update"] = time.perf_counter() - t0
        return metrics

    def _rollout_round(self, step: int, r: int):
        """Rollout round `r` of training step `step`. Round 0 is the step's own batch; DAPO's extra round r ≥ 1
        is batch (step − 1)·R + r of the extra stream (R = algo.dapo_resample_rounds; its own shuffle, or file
        order from the second batch on when data.shuffle is off), seeded apart from every step: keyed by
        (step, r) alone, so an interrupted and resumed run draws the same prompts whatever train.steps says."""
        t = self.cfg.train
        if r == 0:
            prompts, seed = self.prompt_sampler.batch(step - 1), step_seed(t.seed, step)
        else:
            k = (step - 1) * self.cfg.algo.dapo_resample_rounds + r
            prompts, seed = self.extra_sampler.batch(k), step_seed(t.seed + EXTRA_SEED, k)
        mine = D.shard_prompts(list(range(len(prompts))))  # this rank's places in the global batch
        with D.full_parameters(self.model):
            return self.rollout.run([prompts[i] for i in mine], seed=seed, seed_indices=mine)

    def _rollout(self, step: int) -> tuple[list, dict]:
        """This rank's trees to train on, and the rollout metrics. Under algo=dapo: the informative prompts of up
        to 1 + dapo_resample_rounds rounds, length-penalised; the metrics then cover every prompt rolled out
        (its tool executions, tokens and time were spent), before the penalty, plus `dapo/*` counts."""
        a = self.cfg.algo
        if a.name != "dapo":
            result = self._rollout_round(step, 0)
            return result.trees, rollout_metrics(result.trees, result.stats)
        sample = dynamic_sampling(lambda r: self._rollout_round(step, r), self.local_prompts, a.dapo_resample_rounds,
                                  common=lambda n: int(-D.max_across_ranks(-n)))
        metrics = rollout_metrics(sample.rolled, sample.stats)
        max_len = self.cfg.rollout.max_response_tokens
        pen = apply_overlong_penalty(sample.kept, max_len, overlong_buffer_tokens(max_len, a.dapo_overlong_buffer),
                                     a.dapo_overlong_penalty)
        sampled, dropped, kept, penalty, hit, leaves = D.sum_across_ranks(
            [sample.sampled, sample.dropped, len(sample.kept), pen["penalty"], pen["penalised"], pen["leaves"]])
        metrics.update({"dapo/rounds": sample.rounds, "dapo/sampled_prompts": int(sampled),
                        "dapo/dropped_prompts": int(dropped), "dapo/kept_prompts": int(kept),
                        "dapo/overlong_penalty": penalty / max(leaves, 1),
                        "dapo/overlong_leaves": hit / max(leaves, 1)})
        return sample.kept, metrics

    def evaluate(self) -> dict:
        if not self.eval_prompts:
            return {}
        with D.full_parameters(self.model):
            m = evaluate(self.engine, self.tools, self.reward_fn, self.eval_prompts, self.cfg,
                         part=(D.rank(), D.world_size()))
        k = m["samples"]
        return {"eval/accuracy": m["accuracy"], f"eval/pass@{k}": m[f"pass@{k}"],
                "eval/tool_calls": m["tool_calls"], "eval/reward": m["reward"], "eval/format_ok": m["format_ok"]}

    def save(self, step: int, metrics: dict) -> str:
        state = {"start_model": self.start_model_path, "metrics": metrics, "config": config_to_dict(self.cfg)}
        if self.sharded:
            return dcp_lib.save_step(self.run_dir, step, self.model, self.optimizer, scheduler=self.lr_scheduler,
                                     save_tokenizer=self.tokenizer.save_pretrained, state=state,
                                     keep_last=self.cfg.train.keep_last, hf_dtype=self.decode_dtype)
        return ckpt_lib.save_checkpoint(self.run_dir, step, save_model=self.model.save_pretrained,
                                        save_tokenizer=self.tokenizer.save_pretrained, optimizer=self.optimizer,
                                        scheduler=self.lr_scheduler, state=state, keep_last=self.cfg.train.keep_last)

    # --- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        log = cfg.log
        if self.main:  # one rank writes the logs; metrics are already reduced over ranks
            with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(config_to_yaml(cfg))
            logger = MetricsLogger(self.run_dir, resume_step=self.start_step if self.resume_path else None,
                                   tensorboard=log.tensorboard, wandb=log.wandb, wandb_project=log.wandb_project,
                                   wandb_run_name=log.wandb_run_name, config=config_to_dict(cfg))
        else:
            logger = _NoLogger()
        summary: dict = {"run_dir": self.run_dir, "start_model": self.start_model_path, "algo": cfg.algo.name,
                         "rollout_mode": cfg.rollout_mode, "seed": t.seed}
        if self.sft_summary is not None:
            summary["sft"] = self.sft_summary
        t_start = time.perf_counter()
        bar = progress_bar(t.steps, "arpo", self.progress, initial=self.start_step)
        last: dict = {}
        path = None
        stopped = None
        with StopOnSignal(self.echo) as stop:  # SIGTERM / Ctrl-C: finish the step, checkpoint, stop
            try:
                if not self.resume_path:
                    first = self.evaluate()
                    if first:
                        logger.log(0, first)
                        summary["eval_start"] = first
                        self.echo(f"held-out before RL: {_eval_line(first)}")
                for step in range(self.start_step + 1, t.steps + 1):
                    last = self.step(step)
                    if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                        last.update(self.evaluate())
                    row = logger.log(step, last)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(progress_postfix(row))
                    else:
                        self.echo(f"step {step}/{t.steps} {progress_postfix(row)}")
                    saved = (t.save_every and step % t.save_every == 0) or step == t.steps
                    if saved:
                        path = self.save(step, last)
                    stopped = stop.agreed()  # the same on every rank
                    if stopped:
                        if t.save_on_signal and not saved:
                            path = self.save(step, last)
                        self.echo(f"stopped after step {step}" + (f"; checkpoint {path}" if path else ""))
                        break
            finally:
                if bar is not None:
                    bar.close()
                logger.close()
        summary.update(final=last, checkpoint=path or self.resume_path, wall_s=time.perf_counter() - t_start)
        if stopped:
            summary["stopped_by_signal"] = stopped
        if "eval/accuracy" in last:
            summary["eval_end"] = {k: v for k, v in last.items() if k.startswith("eval/")}
            self.echo(f"held-out after RL: {_eval_line(last)}")
        if self.main:
            with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
        self._finished = True
        return summary

    def close(self) -> None:
        """Close the tools and leave the process group.

        After a finished run every rank first drops what holds the group (FSDP2's modules and the optimizer's
        DTensors keep it alive through their device mesh) and meets the others at a barrier, so gloo's threads
        end inside `destroy_process_group`, not in the interpreter's teardown: seen once in CI as a SIGABRT
        ("terminate called without an active exception") on rank 1 at the end of a finished 2-rank run. After
        a failure there is no barrier: the other ranks may be stuck in a collective, and torchrun stops them."""
        self.tools.close()
        if self.sharded and getattr(self, "_finished", False):
            self.rollout = self.engine = self.optimizer = self.lr_scheduler = None
            self.model = self.ref_model = None
            gc.collect()
            D.barrier()
        D.destroy_distributed()


class _NoLogger:
    """The metrics logger of ranks other than 0."""

    def log(self, step: int, metrics: dict) -> dict:
        return dict(metrics)

    def close(self) -> None:
        pass


def _silent(*args, **kwargs) -> None:
    pass


def _eval_line(m: dict) -> str:
    passes = [k for k in m if k.startswith("eval/pass@")]
    extra = f" {passes[0][5:]}={100 * m[passes[0]]:.1f}%" if passes and not passes[0].endswith("@1") else ""
    return (f"accuracy={100 * m['eval/accuracy']:.1f}%{extra} tool_calls={m['eval/tool_calls']:.2f} "
            f"format_ok={100 * m['eval/format_ok']:.1f}%")
