"""Cold-start SFT (`arpo sft`, and the first phase of the embedded `arpo train`): teach the tool-use format.

RL on a model that never writes `<python>…</python>` has nothing to reinforce, so the policy first imitates
demonstration traces. The loss is the mean negative log-likelihood of the model's *own* tokens only: the prompt
and tool-result spans (` <result>\\n…\\n</result>`, which the tool writes at rollout time) are masked out; the EOS
after the answer is trained, so the model learns to stop.

Traces: the embedded task's demonstrations (`arpo.data.task_demo_segments`), or `sft.train_files` — JSONL rows with a
`prompt` and either `segments: [[text, trainable], ...]` or a `response` text whose tool results are masked
automatically: ` <result>…</result>` spans under `tools.protocol=tags`, the chat template's tool turns
(`<|im_end|>\n<|im_start|>user\n<tool_response>\n…\n</tool_response><|im_end|>\n<|im_start|>assistant\n` for
Qwen) under `hermes`, whose prompts also carry the tools' schemas, as in RL. Batches are packed end to end (varlen
attention, no padding); the log-likelihood goes through the fused `linear_token_loss` (each chunk's gradient
taken in its forward), never materialising [tokens, vocab] logits. The optimiser is AdamW with sft.lr,
optim.weight_decay and optim.grad_clip, and PyTorch's default betas (optim.betas are the RL's).
Where to stop: `sft.stop_accuracy` (the running share of training traces that greedy decoding would reproduce)
or `sft.stop_loss`, else all `sft.steps`.
"""
from __future__ import annotations

import contextlib
import math
import re
import time

import torch

from arpo.engine.stop_ids import primary_eos
from arpo.jsonl import read_jsonl
from arpo.trainer.data import DataError, PromptSampler, encode_prompt
from arpo.tools.protocol import TagsProtocol
from arpo.trainer.metrics import progress_bar

def _segments_of_response(text: str, span: re.Pattern = TagsProtocol.result_span) -> list[tuple[str, bool]]:
    """`text` cut into (piece, trainable): the tool results (`span`, one capture group) are not trained."""
    parts = span.split(text)
    return [(p, not span.fullmatch(p)) for p in parts if p]


def _trace_rows(path: str, span: re.Pattern = TagsProtocol.result_span) -> list[dict]:
    rows = []
    for lineno, row in read_jsonl(path, DataError):
        where = f"{path}, row {lineno}"
        if not isinstance(row, dict) or "prompt" not in row or not ("segments" in row or "response" in row):
            raise DataError(f"{where}: an SFT trace needs 'prompt' and 'segments' or 'response'")
        if "segments" in row:
            segs = row["segments"]
            if not (isinstance(segs, list) and all(isinstance(s, (list, tuple)) and len(s) == 2
                                                   and isinstance(s[0], str) for s in segs)):
                raise DataError(f"{where}: 'segments' must be a list of [text, trainable] pairs")
            segs = [(s[0], bool(s[1])) for s in segs]
        else:
            if not isinstance(row["response"], str):
                raise DataError(f"{where}: 'response' must be a string")
            segs = _segments_of_response(row["response"], span)
        rows.append({"prompt": row["prompt"], "segments": segs})
    if not rows:
        raise DataError(f"{path}: no traces")
    return rows


def load_traces(cfg, protocol=None) -> list[dict]:
    """`{prompt, segments}` demonstrations: sft.train_files (results found as `protocol` writes them), or the
    embedded task's."""
    if cfg.sft.train_files:
        span = (protocol or TagsProtocol({})).result_span
        return [r for f in cfg.sft.train_files for r in _trace_rows(f, span)]
    from arpo.data import task_demo_segments, task_examples

    n = cfg.sft.embedded_traces or cfg.data.embedded_train_size
    exs = task_examples(cfg.data, n, "train", cfg.train.seed)
    return [{"prompt": ex.prompt, "segments": task_demo_segments(ex)} for ex in exs]


def tokenize_trace(tokenizer, trace: dict, data_section, max_tokens: int,
                   eos_id: int | None = None, protocol=None) -> tuple[list[int], list[int]]:
    """(ids, mask): prompt (mask 0, rendered for the tool `protocol`), segments (mask = trainable), EOS (mask 1);
    cut to `max_tokens`.

    `eos_id` (default: the tokenizer's) is the end the model learns to write: one the engine stops on."""
    ids = encode_prompt(tokenizer, trace["prompt"], data_section, protocol)
    mask = [0] * len(ids)
    for text, trainable in trace["segments"]:
        seg = list(tokenizer.encode(text, add_special_tokens=False))
        ids += seg
        mask += [int(trainable)] * len(seg)
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos_id is not None:
        ids.append(int(eos_id))
        mask.append(1)
    return ids[:max_tokens], mask[:max_tokens]


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def packed_nll(model, batch: list[tuple[list[int], list[int]]], bf16: bool = True, seq_acc: bool = False):
    """Mean NLL over the masked-in next tokens of `batch` packed into one varlen forward; (loss, tokens), plus
    with `seq_acc` the fraction of sequences whose every trainable token is the argmax (teacher forced: for
    demonstrations whose untrained spans are deterministic tool results, the share greedy decoding reproduces)."""
    from arpo.model import AttentionContext
    from arpo_kernels import linear_token_loss

    dev = model.device
    ids, pos, cu, pred, tgt, owner = [], [], [0], [], [], []
    for i, (seq, mask) in enumerate(batch):
        base = len(ids)
        ids += seq
        pos += range(len(seq))
        cu.append(len(ids))
        for j in range(1, len(seq)):
            if mask[j]:
                pred.append(base + j - 1)
                tgt.append(seq[j])
                owner.append(i)
    if not tgt:
        raise DataError("an SFT batch has no trainable tokens (all masked or cut by sft.max_tokens)")
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=dev)  # noqa: E731
    ctx = AttentionContext.varlen(t(cu, torch.int32), max(b - a for a, b in zip(cu, cu[1:])))
    with autocast(dev, bf16):
        hidden = model(t(ids), t(pos), ctx)
    w = model.lm_head_weight
    h = hidden.index_select(0, t(pred)).to(w.dtype)
    n = len(tgt)
    loss, _, _ = linear_token_loss(h, w, t(tgt), lambda lp, ent, a, b: -lp.sum() / n)
    if not seq_acc:
        return loss, n
    return loss, n, _sequence_accuracy(h.detach(), w.detach(), t(tgt), t(owner), len(batch))


@torch.no_grad()
def _sequence_accuracy(h: torch.Tensor, w: torch.Tensor, tgt: torch.Tensor, owner: torch.Tensor, n_seq: int,
                       chunk: int = 2048) -> float:
    """Share of sequences with argmax == target at all their trainable positions (logits in row chunks)."""
    wrong = torch.zeros(n_seq, dtype=torch.long, device=h.device)
    for a in range(0, h.shape[0], chunk):
        miss = (h[a:a + chunk].float() @ w.float().T).argmax(-1) != tgt[a:a + chunk]
        wrong.index_add_(0, owner[a:a + chunk], miss.long())
    has = torch.zeros_like(wrong).index_add_(0, owner, torch.ones_like(owner))
    return ((wrong == 0) & (has > 0)).sum().item() / max(int((has > 0).sum()), 1)


def run_sft(model, tokenizer, cfg, logger=None, progress: bool = True, stop_loss: float | None = None,
            stop_accuracy: float | None = None) -> dict:
    """Up to `sft.steps` AdamW steps on the traces; returns the last step's metrics (plus `steps`). The model
    trains in place. Early stops, checked on running means (EMAs over ~20 steps) after at least 50 steps:
    `stop_loss` (default `sft.stop_loss`) once the loss falls below it; `stop_accuracy` (default
    `sft.stop_accuracy`) once the greedy sequence accuracy of the training batches (`packed_nll(seq_acc=True)`:
    the share of traces whose every trained token is the argmax) reaches it. Either gives a cold start that stops at a
    level rather than at a fixed step count, whose outcome varies from seed to seed; the accuracy is the steadier of the
    two (the mean token loss of a copying model says little about whether whole answers come out right)."""
    s = cfg.sft
    stop_loss = s.stop_loss if stop_loss is None else stop_loss
    stop_accuracy = s.stop_accuracy if stop_accuracy is None else stop_accuracy
    if stop_accuracy is not None and not 0.0 < stop_accuracy <= 1.0:
        raise ValueError(f"sft.stop_accuracy must be in (0, 1], got {stop_accuracy}")
    eos_id = primary_eos(model.config, tokenizer)  # in the engine's stop set, whichever file declared it
    from arpo.build import build_protocol

    protocol = build_protocol(cfg, tokenizer)
    traces = [tokenize_trace(tokenizer, tr, cfg.data, s.max_tokens, eos_id, protocol)
              for tr in load_traces(cfg, protocol)]
    sampler = PromptSampler(traces, s.batch_size, cfg.train.seed, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=cfg.optim.weight_decay)  # default betas
    model.train()
    bar = progress_bar(s.steps, "sft", progress)
    last: dict = {}
    t_start = time.perf_counter()
    ema = ema_acc = None
    done = 0
    for step in range(s.steps):
        t0 = time.perf_counter()
        out = packed_nll(model, sampler.batch(step), cfg.train.bf16, seq_acc=stop_accuracy is not None)
        loss, n_tok = out[0], out[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        dt = time.perf_counter() - t0
        last = {"loss": loss.item(), "grad_norm": float(gnorm), "tokens_per_s": n_tok / max(dt, 1e-9),
                "lr": s.lr, "time/update": dt}
        if stop_accuracy is not None:
            last["seq_accuracy"] = out[2]
        if logger is not None:
            logger.log(step + 1, last)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss={last['loss']:.3f}")
        done = step + 1
        ema = last["loss"] if ema is None else 0.9 * ema + 0.1 * last["loss"]
        if stop_accuracy is not None:
            ema_acc = out[2] if ema_acc is None else 0.9 * ema_acc + 0.1 * out[2]
        if done >= 50 and ((stop_loss is not None and ema < stop_loss)
                           or (stop_accuracy is not None and ema_acc >= stop_accuracy)):
            break
    if bar is not None:
        bar.close()
    model.eval()
    last.update(wall_s=time.perf_counter() - t_start, steps=done)
    return last
