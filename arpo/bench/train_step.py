"""One whole ARPO step — tree rollout on the engine, rewards, packing, update — timed phase by phase.

Why: every other benchmark times a component; this one says what a training step costs and where the time goes.
Random weights and a synthetic tool keep every length fixed, so the step is the same on every machine:

- Model: Qwen2.5-3B's shape (hidden 2048, 36 layers, 16 heads / 2 KV heads of 128, MLP 11008, vocab 151,936)
  on CUDA in bf16; `--quick` (and any CPU run) a tiny Qwen2 (hidden 128, 2 layers, vocab 512) in fp32.
- Rollout (`scripted_tree_rollout`): per prompt, N global chains decode `segment` tokens each
  (`ignore_eos`), then call the synthetic tool (a thread pool; each call sleeps `tool_latency_ms`, returns
  `result_len` fixed tokens, appended with `engine.extend`); after each result the chains fork (`engine.fork`,
  shared blocks) until the prompt has M leaves; after `tool_calls` calls a last segment ends each leaf. Response
  = `tool_calls` results + (tool_calls + 1) segments = `response` tokens. Rewards: a fixed coin per leaf.
  (TreeRollout needs a model that writes tool tags; random weights never do, so the branch points are scripted —
  the engine work, forks and tool waits are the real ones.)
- Update: the trees in micro-batches of `micro_batch_tokens` packed tokens, token-mean soft loss through the
  trainer's own `arpo.trainer.update.micro_loss` (tree-packed, dense mask) or verl's row loss (rows), backward,
  one AdamW step.

Providers (the same rollout, three trainers, in one run):
- `tree-packed`: the trainer's path (`arpo.trainer.update.tree_context`: the interval kernel on CUDA,
  block-sparse SDPA on the CPU).
- `dense-mask`: the same packed batch with the dense [T, T] ancestor mask (SDPA).
- `duplicated-rows` (baseline): one row per leaf, varlen causal attention (TRL / verl's way), verl's row loss.
Extra columns: the split (rollout / tools / packing / fwd_bwd / optimizer, ms), decode tokens/s, training tokens/s
(the tokens each trainer forwards / its fwd+bwd time), MFU of the forward+backward (the tree's useful FLOPs:
6·params·tokens + attention 12·layers·Hq·D·Σ visible keys, over the card's bf16 dense peak; CUDA only).
Shapes: `ARPO_TRAIN_STEP="prompts=32 leaves=16 initial=8 prompt=1024 response=2048 tool_calls=2"` overrides
any field of `Case`.

    arpo bench train-step --quick            # CPU, seconds
    arpo bench train-step --device cuda      # the default 32 x 16 step at 3B shapes
"""
from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

import torch

DOC = "one whole ARPO step (rollout, tools, packing, fwd+bwd, optimizer): tree-packed vs dense mask vs rows"
BASELINE = "duplicated-rows"
REPS = (0, 1)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass
class Case:
    prompts: int = 32
    leaves: int = 16
    initial: int = 8
    prompt: int = 1024
    response: int = 2048
    tool_calls: int = 2
    result_len: int = 64
    tool_latency_ms: float = 200.0
    micro_batch_tokens: int = 16384
    device: str = "cpu"
    small_model: bool = False

    @property
    def segment(self) -> int:
        return (self.response - self.tool_calls * self.result_len) // (self.tool_calls + 1)

    @property
    def label(self) -> str:
        return (f"train-step {self.prompts}p M={self.leaves} N={self.initial} prompt={self.prompt} "
                f"resp={self.response} calls={self.tool_calls}")

    def extra(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "device"}


def _overrides() -> dict:
    spec = os.environ.get("ARPO_TRAIN_STEP", "").split()
    types = {f.name: f.type for f in fields(Case)}
    out = {}
    for item in spec:
        key, _, value = item.partition("=")
        if key not in types or key == "device":
            raise SystemExit(f"ARPO_TRAIN_STEP: unknown field {key!r}; fields: {', '.join(types)}")
        out[key] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true")}[types[key]](value)
    return out


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        case = Case(prompts=2, leaves=4, initial=2, prompt=48, response=96, tool_calls=2, result_len=8,
                    tool_latency_ms=5.0, micro_batch_tokens=512, device=device, small_model=True)
    else:
        case = Case(device=device, small_model=not device.startswith("cuda"))
    return [replace(case, **_overrides())]


def _model(case: Case):
    from arpo.model import CausalLM, ModelConfig

    if case.small_model:
        cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                          max_position_embeddings=8192)
        dtype = torch.float32
    else:  # Qwen2.5-3B
        cfg = ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, head_dim=128, rope_theta=1e6,
                          max_position_embeddings=32768, tie_word_embeddings=True)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    model = CausalLM(cfg).to(case.device, dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def scripted_tree_rollout(engine, case: Case, seed: int = 0) -> tuple[list, dict]:
    """Trees of exactly `case.leaves` leaves per prompt (module docstring); returns (trees, phase times in s)."""
    from arpo.engine import SamplingParams
    from arpo.rollout.tree import ROOT, RolloutTree

    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    result = [rng.randrange(vocab) for _ in range(case.result_len)]
    params = SamplingParams(temperature=1.0, max_tokens=case.segment, ignore_eos=True)
    trees, seqs = [], []  # seqs: [prompt index, seq id, last segment id, tokens of it already in segments]
    for b in range(case.prompts):
        trees.append(RolloutTree(prompt_ids=[rng.randrange(vocab) for _ in range(case.prompt)], prompt=f"p{b}"))
        for j in range(case.initial):
            sid = engine.add(trees[b].prompt_ids, replace(params, seed=seed * 100003 + b * 1009 + j))
            seqs.append([b, sid, ROOT, case.prompt])
    branches = [case.leaves - case.initial] * case.prompts
    times = {"rollout": 0.0, "tools": 0.0}
    pool = ThreadPoolExecutor(max_workers=32)

    def tool(_):
        time.sleep(case.tool_latency_ms / 1000)
        return result

    for r in range(case.tool_calls + 1):
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        _sync(case.device)
        times["rollout"] += time.perf_counter() - t0
        if r < case.tool_calls:
            t0 = time.perf_counter()
            results = list(pool.map(tool, seqs))
            times["tools"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for entry, res in zip(list(seqs), results if r < case.tool_calls else [None] * len(seqs)):
            b, sid, _, _ = entry
            if res is not None:
                engine.extend(sid, res, max_tokens=(r + 2) * case.segment)  # a budget of sampled tokens in all
            entry[2] = _add_segment(trees[b], engine.sequence(sid), entry)
        if r < case.tool_calls:  # fork after this result: this round's share of the prompt's branches
            for b in range(case.prompts):
                share = branches[b] // (case.tool_calls - r)
                parents = [e for e in seqs if e[0] == b]
                for i in range(share):
                    e = parents[i % len(parents)]
                    for child in engine.fork(e[1], 1):
                        seqs.append([b, child, e[2], e[3]])
                branches[b] -= share
        times["rollout"] += time.perf_counter() - t0
    pool.shutdown()
    for b, sid, seg, _ in seqs:
        trees[b].add_leaf(seg, reward=float(rng.random() < 0.5), tool_calls=case.tool_calls, finish_reason="length")
        engine.release(sid)
    return trees, times


def _add_segment(tree, seq, entry) -> int:
    """The tokens `seq` gained since `entry` last recorded it, as a segment under entry's last segment."""
    start, out0 = entry[3], entry[3] - seq.prompt_len
    ids = seq.token_ids[start:]
    sampled = seq.out_sampled[out0:]
    seg = tree.add_segment(entry[2], ids, seq.out_logprobs[out0:], seq.out_entropies[out0:],
                           [int(bool(s)) for s in sampled])
    entry[3] = seq.num_tokens
    return seg.id


def _flops(model, trees) -> float:
    """Useful forward+backward FLOPs of the trees' unique tokens (module docstring)."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    if getattr(cfg, "tie_word_embeddings", False):
        params += cfg.vocab_size * cfg.hidden_size  # the lm_head matmul still runs
    tokens, visible = 0, 0
    for t in trees:
        for s in [None] + list(t.segments):
            n = len(t.prompt_ids) if s is None else len(s)
            depth = 0 if s is None else t.depth_offset(s.id)
            tokens += n
            visible += n * depth + n * (n + 1) // 2
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * visible
    return 6.0 * params * tokens + attn


def _peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _groups(trees, max_tokens: int, size) -> list[list]:
    groups, cur, n = [], [], 0
    for t in trees:
        if cur and n + size(t) > max_tokens:
            groups.append(cur)
            cur, n = [], 0
        cur.append(t)
        n += size(t)
    return groups + ([cur] if cur else [])


def _packed_update(model, trees, case: Case, dense: bool, times: dict) -> int:
    """Tree-packed micro-batches through the trainer's loss (`micro_loss`, default algo settings) with its tree
    context or the dense mask; returns packed tokens trained."""
    from arpo.algo import pack_trees
    from arpo.config import load_config
    from arpo.model import AttentionContext
    from arpo.trainer.update import micro_loss, tree_context

    cfg = load_config(None, [])  # train.bf16 (default on) autocasts on CUDA only
    total, k, tokens = pack_trees(trees).loss_weights("soft", "token-mean"), 0, 0
    for group in _groups(trees, case.micro_batch_tokens, lambda t: t.num_unique_tokens()):
        t0 = time.perf_counter()
        micro = pack_trees(group).to(case.device)
        ctx = AttentionContext.tree(micro.attention_mask()) if dense else tree_context(micro)
        n = micro.targets.numel()
        w = type(total)(*(x[k:k + n].to(case.device) for x in total))
        _sync(case.device)
        t1 = time.perf_counter()
        micro_loss(model, micro, w, cfg, 1.0, ctx)[0].backward()  # the trainer's loss path
        _sync(case.device)
        times["packing"] += t1 - t0
        times["fwd_bwd"] += time.perf_counter() - t1
        k += n
        tokens += micro.num_tokens
    return tokens


def _rows_update(model, trees, case: Case, times: dict) -> int:
    """One row per leaf (varlen causal), verl's token-mean row loss per micro-batch; returns row tokens."""
    from arpo.algo import leaf_rows
    from arpo.bench.policy_loss import row_batch, row_loss

    tokens = 0
    for group in _groups(trees, case.micro_batch_tokens, lambda t: t.num_leaf_tokens()):
        t0 = time.perf_counter()
        rows = leaf_rows(group)
        batch = row_batch(rows, case.device)
        _sync(case.device)
        t1 = time.perf_counter()
        row_loss(model, batch, bf16=case.device.startswith("cuda")).backward()
        _sync(case.device)
        times["packing"] += t1 - t0
        times["fwd_bwd"] += time.perf_counter() - t1
        tokens += rows.num_tokens
    return tokens


def make_step(case: Case, trainer: str):
    """A zero-argument callable running one whole step; `.extra` holds the split of its second (warm) run."""
    from arpo.engine import LLMEngine

    model = _model(case)
    max_len = case.prompt + case.response + 16
    engine = LLMEngine(model, block_size=16, max_model_len=max_len, max_num_seqs=min(256, case.prompts * case.leaves),
                       max_num_batched_tokens=max(8192, case.prompt), enable_prefix_caching=False,
                       memory_fraction=0.35, num_blocks=None if case.device.startswith("cuda") else
                       case.prompts * case.leaves * (max_len // 16 + 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, foreach=True)
    flops = None

    def run():
        nonlocal flops
        times = {"rollout": 0.0, "tools": 0.0, "packing": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0}
        model.eval()
        with torch.no_grad():
            trees, rt = scripted_tree_rollout(engine, case)
        times.update(rt)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        if trainer == "rows":
            trained = _rows_update(model, trees, case, times)
        else:
            trained = _packed_update(model, trees, case, trainer == "dense", times)
        t0 = time.perf_counter()
        optimizer.step()
        _sync(case.device)
        times["optimizer"] = time.perf_counter() - t0
        flops = flops or _flops(model, trees)
        sampled = sum(sum(s.loss_mask) for t in trees for s in t.segments)
        run.last = (trees, times, trained, sampled)
        return None

    run()
    run()  # the split below is a warm step's
    trees, times, trained, sampled = run.last
    peak = _peak_tflops(case.device)
    run.extra = {**{f"{k}_ms": round(v * 1e3, 2) for k, v in times.items()},
                 "decode_tokens_per_s": round(sampled / max(times["rollout"], 1e-9), 1),
                 "train_tokens_per_s": round(trained / max(times["fwd_bwd"], 1e-9), 1),
                 "trained_tokens": trained, "unique_tree_tokens": sum(t.num_unique_tokens() for t in trees),
                 "leaves": sum(len(t.leaves) for t in trees),
                 "mfu": round(flops / times["fwd_bwd"] / (peak * 1e12), 4) if peak else None}
    return run


def providers(device: str) -> dict:
    return {
        "duplicated-rows": lambda case: make_step(case, "rows"),
        "dense-mask": lambda case: make_step(case, "dense"),
        "tree-packed": lambda case: make_step(case, "tree"),
    }


def report(results) -> str:
    """The split and rates of each provider, one line each."""
    keys = ("rollout_ms", "tools_ms", "packing_ms", "fwd_bwd_ms", "optimizer_ms", "decode_tokens_per_s",
            "train_tokens_per_s", "trained_tokens", "mfu")
    lines = [f"{'provider':18s} " + " ".join(f"{k:>19s}" for k in keys)]
    for r in results:
        lines.append(f"{r.provider:18s} " + " ".join(f"{str(r.extra.get(k)):>19s}" for k in keys))
    return "\n".join(lines)
