"""The ARPO step loop behind `arpo train`: rollout → rewards → advantages → tree-packed update → metrics.

    trainer = Trainer(load_config("arpo/configs/embedded.yaml"))
    summary = trainer.train()      # checkpoints, metrics.jsonl, plots in cfg.train.run_dir

One step (1-based `step`):
1. the prompts of the step (`PromptSampler`, a pure function of (seed, step));
2. `TreeRollout.run` on the engine that holds the policy's own parameters (no copy), tools in the loop, seeded by
   (train.seed, step) — tree rollouts for ARPO, independent trajectories for GRPO (`algo=grpo`);
3. rewards come with the leaves; `policy_update` packs the trees, normalises advantages per prompt, applies the
   segmented PPO loss (soft or hard attribution) in mini-batches and steps AdamW; the lr scheduler steps;
4. metrics go to metrics.jsonl / TensorBoard / W&B: reward, accuracy (leaves with reward 1), format_ok, entropy
   (sampler, per sampled token), tool_calls_per_leaf, branch_rate (branches per tool call), leaves,
   mixed_groups (prompts whose leaves got different rewards — the others give zero advantage), tokens_per_s,
   packed_tokens / packing_saving (tree packing vs one row per leaf), time/rollout, time/tools, time/update,
   loss, grad_norm, lr, update/* (clip fractions, approx_kl, trainer entropy, kl) and logprob_gap/* (sampler vs
   trainer log-probs of the same tokens); held-out eval/* every `train.eval_every` steps, at step 0 (the start
   model) and at the end; checkpoints every `train.save_every` steps and at the end.

Determinism: every random choice is seeded from train.seed and the step, tool results are awaited each decode
step, and the checkpoint holds weights, optimiser, scheduler and RNG states — so `--resume` reproduces the
metrics an uninterrupted run would have logged (timings aside).

Cold start: with `sft.steps > 0` and no checkpoint to resume, the start model is first fine-tuned on the
demonstrations (`arpo.trainer.sft`) and saved to RUN_DIR/sft_model, which later runs in that directory reuse.
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch

from arpo.config import check_paths, config_to_dict, config_to_yaml
from arpo.trainer import checkpoint as ckpt_lib
from arpo.trainer.components import (build_engine, build_reward, build_tools, make_rollout, set_threads,
                                     step_seed)
from arpo.trainer.data import PromptSampler, eval_rows, prompt_inputs, train_rows
from arpo.trainer.embedded import base_model_path, load_policy
from arpo.trainer.evaluate import evaluate, is_correct
from arpo.trainer.metrics import MetricsLogger, progress_postfix
from arpo.trainer.schedule import build_optimizer
from arpo.trainer.update import policy_update

SFT_MODEL_DIR = "sft_model"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rollout_metrics(trees: list, stats: dict) -> dict:
    """Per-step numbers about the rollout batch."""
    leaves = [l for t in trees for l in t.leaves]
    n = max(len(leaves), 1)
    ent_sum = ent_n = sampled = 0.0
    for t in trees:
        for s in t.segments:
            for e, m in zip(s.entropies, s.loss_mask):
                if m:
                    ent_sum += e
                    ent_n += 1
        sampled += sum(sum(s.loss_mask) for s in t.segments)
    calls = sum(l.tool_calls for l in leaves)
    branches = sum(int(t.metadata.get("branches", 0)) for t in trees)
    wall, decode = stats.get("wall_s", 0.0), stats.get("decode_s", 0.0)
    unique = sum(t.num_unique_tokens() for t in trees)
    return {
        "reward": sum(l.reward for l in leaves) / n,
        "accuracy": sum(is_correct(l.reward) for l in leaves) / n,
        "format_ok": sum(l.reward > -1.0 for l in leaves) / n,
        "entropy": ent_sum / max(ent_n, 1),
        "tool_calls_per_leaf": calls / n,
        "branch_rate": branches / max(stats.get("tool_calls", calls), 1),
        "leaves": len(leaves),
        "mixed_groups": sum(len(set(t.rewards())) > 1 for t in trees) / max(len(trees), 1),
        "response_tokens": sum(len(t.leaf_token_ids(l)) for t in trees for l in t.leaves) / n,
        "tokens_per_s": sampled / max(wall, 1e-9),
        "packed_tokens": unique,
        "packing_saving": 1.0 - unique / max(sum(t.num_leaf_tokens() for t in trees), 1),
        "time/rollout": decode,
        "time/tools": max(wall - decode, 0.0),
    }


class Trainer:
    def __init__(self, cfg, *, progress: bool | None = None, echo=print):
        check_paths(cfg)
        self.cfg = cfg
        self.run_dir = cfg.train.run_dir
        self.echo = echo
        self.progress = cfg.log.progress_bar if progress is None else progress
        set_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        os.makedirs(self.run_dir, exist_ok=True)
        self.resume_path = ckpt_lib.resolve_resume(self.run_dir, cfg.train.resume)
        self.start_step = 0
        self.sft_summary: dict | None = None
        if self.resume_path:
            ck = ckpt_lib.load_checkpoint(self.resume_path)
            self.start_step = ck.step
            self.start_model = ck.state.get("start_model", self.resume_path)
            self.model, self.tokenizer = load_policy(self.resume_path, cfg.model)
        else:
            ck = None
            self.start_model = self._start_model()
            if self.sft_summary is None:
                self.model, self.tokenizer = load_policy(self.start_model, cfg.model)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model, _ = load_policy(self.start_model, cfg.model)
            self.ref_model.requires_grad_(False).eval()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps)
        if ck is not None:
            if ck.optimizer:
                self.optimizer.load_state_dict(ck.optimizer)
            if ck.scheduler:
                self.scheduler.load_state_dict(ck.scheduler)
        self.tools = build_tools(cfg)
        self.reward_fn = build_reward(cfg)
        leaves = max(cfg.rollout.leaves, cfg.train.eval_samples)
        self.engine = build_engine(self.model, self.tokenizer, cfg, cfg.train.batch_prompts * leaves + 64)
        self.rollout = make_rollout(self.engine, self.tools, self.reward_fn, cfg)
        self.train_prompts = prompt_inputs(train_rows(cfg), self.tokenizer, cfg.data)
        self.eval_prompts = prompt_inputs(eval_rows(cfg), self.tokenizer, cfg.data)
        self.sampler = PromptSampler(self.train_prompts, cfg.train.batch_prompts, cfg.train.seed, cfg.data.shuffle)
        if ck is not None:
            ck.restore_rng()
        self.model.eval()

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
        stop = getattr(self.cfg.sft, "stop_loss", None)
        self.echo(f"cold start: up to {self.cfg.sft.steps} SFT steps on the demonstrations"
                  + (f" (until the loss is below {stop:g})" if stop else ""))
        with MetricsLogger(os.path.join(self.run_dir, "sft")) as logger:
            self.sft_summary = run_sft(self.model, self.tokenizer, self.cfg, logger, progress=self.progress,
                                       stop_loss=stop)
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
        prompts = self.sampler.batch(step - 1)
        self.model.eval()
        trees = self.rollout.run(prompts, seed=step_seed(cfg.train.seed, step))
        metrics = rollout_metrics(trees, self.rollout.stats)
        t0 = time.perf_counter()
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update(policy_update(self.model, trees, cfg, self.optimizer, self.ref_model))
        self.scheduler.step()
        metrics["time/update"] = time.perf_counter() - t0
        return metrics

    def evaluate(self) -> dict:
        if not self.eval_prompts:
            return {}
        m = evaluate(self.engine, self.tools, self.reward_fn, self.eval_prompts, self.cfg)
        k = m["samples"]
        return {"eval/accuracy": m["accuracy"], f"eval/pass@{k}": m[f"pass@{k}"],
                "eval/tool_calls": m["tool_calls"], "eval/reward": m["reward"], "eval/format_ok": m["format_ok"]}

    def save(self, step: int, metrics: dict) -> str:
        state = {"start_model": self.start_model, "metrics": metrics, "config": config_to_dict(self.cfg)}
        return ckpt_lib.save_checkpoint(self.run_dir, step, save_model=self.model.save_pretrained,
                                        save_tokenizer=self.tokenizer.save_pretrained, optimizer=self.optimizer,
                                        scheduler=self.scheduler, state=state, keep_last=self.cfg.train.keep_last)

    # --- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_to_yaml(cfg))
        log = cfg.log
        logger = MetricsLogger(self.run_dir, resume_step=self.start_step if self.resume_path else None,
                               tensorboard=log.tensorboard, wandb=log.wandb, wandb_project=log.wandb_project,
                               wandb_run_name=log.wandb_run_name, config=config_to_dict(cfg))
        summary: dict = {"run_dir": self.run_dir, "start_model": self.start_model, "algo": cfg.algo.name,
                         "rollout_mode": cfg.rollout_mode, "seed": t.seed}
        if self.sft_summary is not None:
            summary["sft"] = self.sft_summary
        t_start = time.perf_counter()
        bar = _bar(t.steps, self.start_step, self.progress)
        last: dict = {}
        path = None
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
                if (t.save_every and step % t.save_every == 0) or step == t.steps:
                    path = self.save(step, last)
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        summary.update(final=last, checkpoint=path or self.resume_path, wall_s=time.perf_counter() - t_start)
        if "eval/accuracy" in last:
            summary["eval_end"] = {k: v for k, v in last.items() if k.startswith("eval/")}
            self.echo(f"held-out after RL: {_eval_line(last)}")
        with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        return summary

    def close(self) -> None:
        self.tools.close()


def _eval_line(m: dict) -> str:
    passes = [k for k in m if k.startswith("eval/pass@")]
    extra = f" {passes[0][5:]}={100 * m[passes[0]]:.1f}%" if passes and not passes[0].endswith("@1") else ""
    return (f"accuracy={100 * m['eval/accuracy']:.1f}%{extra} tool_calls={m['eval/tool_calls']:.2f} "
            f"format_ok={100 * m['eval/format_ok']:.1f}%")


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="arpo", unit="step", dynamic_ncols=True)
