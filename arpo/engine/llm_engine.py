"""LLMEngine: continuous-batching decoding on a paged KV cache, with fork and extend for tree rollouts.

    engine = LLMEngine.from_pretrained("path/to/qwen2", dtype=torch.bfloat16, device="cuda")
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=32))

The low-level API is what the ARPO rollout drives: `add` a prompt, `step` until a sequence stops (at a tool tag,
say), `extend` it with the tool result's tokens (prefilled into the same cache), `fork` it into children that
share its blocks (copy-on-write, no re-prefill), `release` it when done. Every sampled token comes with its
log-prob and the exact full-vocabulary entropy of the distribution it was drawn from.

The engine holds the model object it was given: a trainer that updates those parameters in place decodes the
next step with the new weights — no copy, no sync.
"""
from __future__ import annotations

import itertools
import random
import warnings
from dataclasses import fields, replace

import torch

from arpo.engine.block_manager import BlockManager
from arpo.engine.config import EngineConfig
from arpo.engine.scheduler import CacheTooSmallError, Scheduler
from arpo.engine.sequence import (
    Completion,
    SamplingParams,
    Sequence,
    SequenceStatus,
    StepOutput,
    mix_seed,
)
from arpo.engine.model_runner import ModelRunner
from arpo.engine.stop_ids import eos_ids
from arpo.engine.tokenizer_files import NO_TOKENIZER, checkpoint_tokenizer


class LLMEngine:
    def __init__(self, model, config: EngineConfig | None = None, *, tokenizer=None,
                 eos_token_id: int | list[int] | None = None, kv_dtype: torch.dtype | None = None, **settings):
        """`config` holds the engine's settings (`EngineConfig`); keyword `settings` are EngineConfig fields that
        replace its values (`LLMEngine(model, block_size=4, num_blocks=32)`). The tokenizer, the end-of-sequence
        ids and the cache dtype (default: the model's; FSDP2 mixed precision keeps fp32 shards and decodes in
        bf16) are facts of the caller's model, not settings. `eos_token_id=None` stops on every EOS id the
        checkpoint declares (see `stop_ids`); an int or a list replaces them (`[]`: none). Without a tokenizer
        the engine works on token ids and refuses stop strings."""
        config = config or EngineConfig()
        if settings:
            names = {f.name for f in fields(EngineConfig)}
            bad = sorted(set(settings) - names)
            if bad:
                raise TypeError(f"LLMEngine got unknown setting(s) {', '.join(bad)}; EngineConfig fields: "
                                f"{', '.join(sorted(names))}")
            config = replace(config, **settings)
        cfg = model.config
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or getattr(cfg, "max_position_embeddings", 32768)
        self.eos_token_ids = eos_ids(cfg, tokenizer, eos_token_id)
        self.block_size = config.block_size
        self.kv_dtype = kv_dtype or model.dtype
        num_blocks = config.num_blocks
        if num_blocks is None:
            num_blocks = self._blocks_for_memory(config.memory_fraction)
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, self.block_size, kv_dtype=self.kv_dtype,
                                  decode_graphs=config.resolved_graphs(model.device.type),
                                  max_batch=min(config.max_num_seqs, 256), max_model_len=self.max_model_len)
        self.seqs: dict[int, Sequence] = {}
        self._pieces: dict[int, str] = {}  # token id -> its text alone (the stop-string pre-check)
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._seed_rng = random.Random(config.seed)
        # prefill/decode tokens: positions newly written to the cache; refed_tokens: positions fed again only for
        # their logits (a forked child's last shared token), whose K/V was already cached.
        # dropped_steps: steps launched ahead (decode_overlap) and dropped because the batch changed (`sync`).
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "refed_tokens": 0, "steps": 0, "preemptions": 0,
                      "block_copies": 0, "dropped_steps": 0}
        self._overlap = config.resolved_overlap(model.device.type)
        self._ahead = None  # (chunks, LaunchedStep) of the step launched before step() returned
        self._written_ahead: dict[int, int] = {}  # seq id -> position whose K/V a dropped step wrote

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None, tokenizer=None, **kw):
        """Load a local Hugging Face checkpoint directory (Qwen2/2.5, Qwen3, Llama 3.x) and build an engine on it, with
        the tokenizer saved there (none, and a warning, when the directory has no tokenizer files)."""
        from arpo.model import CausalLM

        model = CausalLM.from_pretrained(path, dtype=dtype, device=device)
        if tokenizer is None:
            tokenizer = checkpoint_tokenizer(path)
            if tokenizer is None:
                warnings.warn(f"{path}: no tokenizer files; {NO_TOKENIZER}", stacklevel=2)
        return cls(model, tokenizer=tokenizer, **kw)

    def _blocks_for_memory(self, fraction: float) -> int:
        cfg = self.model.config
        per_block = (2 * cfg.num_hidden_layers * self.block_size * cfg.num_key_value_heads * cfg.head_dim
                     * torch.empty((), dtype=self.kv_dtype).element_size())
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return max(1, int(free * fraction) // per_block)
        # CPU: room for 64 sequences of max_model_len, capped at 1 GiB of cache.
        tokens = min(64 * self.max_model_len, (1 << 30) // max(per_block // self.block_size, 1))
        return max(1, -(-tokens // self.block_size))

    # --- the low-level API -----------------------------------------------------------------------------------
    def add(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt; returns its sequence id. Nothing runs until `step`."""
        params = params or SamplingParams()
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop={list(params.stop)}: {NO_TOKENIZER}")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for vocabulary size {vocab}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_model_len="
                             f"{self.max_model_len}")
        self.sync()
        seq_id = next(self._ids)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        self.seqs[seq_id] = Sequence(seq_id, prompt_ids, len(prompt_ids), params, int(seed) & ((1 << 63) - 1),
                                     next(self._arrivals))
        return seq_id

    def step(self) -> list[StepOutput]:
        """Run one scheduled forward over the active sequences; returns the tokens sampled in it.

        With `decode_overlap` the next step is launched before this one returns when it is all decodes (the
        steady state): the device computes it while the caller handles these tokens, and the next `step()` only
        waits for it. A call that changes what that step would have scheduled (`add`, `fork`, `extend`,
        `resume`, releasing a sequence it feeds) first drops it (`sync`), so every call returns what the serial
        engine returns.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            active = self._active()
            if not active:
                return []
            ahead = self._launch(active)
        outputs = self._collect(*ahead)
        if self._overlap:
            active = self._active()
            if active and self.scheduler.all_decodes(active):
                self._ahead = self._launch(active)
        return outputs

    def _active(self) -> list[Sequence]:
        return [s for s in self.seqs.values() if s.status != SequenceStatus.STOPPED]

    def sync(self) -> None:
        """Drop the decode step launched ahead, if any (see `step`); call it before changing the model's weights
        while sequences are still active, since that step read the old ones.

        The dropped step's K/V writes stay: they are the ones the next step would make (each fed token's K/V at
        its position). Its sequences' fed tokens are left cached but not computed, so the next step re-feeds them
        without writing (slot -1, as a fork's last shared token) and samples exactly what the dropped step did.
        """
        if self._ahead is not None:
            chunks, launched = self._ahead
            launched.result()  # the device is done with the step's inputs and cache writes
            self._ahead = None
            self.stats["dropped_steps"] += 1
            # the re-feed of a token written here counts as its decode (as in the serial engine), not as refed
            self._written_ahead.update((c.seq.seq_id, c.start) for c in chunks if c.slots[0] >= 0)

    def _launch(self, active: list[Sequence]):
        """Schedule one step, perform its block copies and launch its forward: (chunks, launched step)."""
        plan = self.scheduler.schedule(active)
        chunks = plan.chunks
        self.stats["preemptions"] += len(plan.preempted)
        if not chunks:
            raise CacheTooSmallError(self.scheduler.too_small(active[0], active[0].num_tokens))
        self.runner.copy_blocks(plan.copies)
        self.stats["block_copies"] += len(plan.copies)
        tables = [self.block_manager.block_table(c.seq.seq_id) for c in chunks]
        return chunks, self.runner.launch(chunks, tables)

    def _collect(self, chunks, launched) -> list[StepOutput]:
        """Wait for a launched step's tokens and apply them: computed positions, sampled tokens, stops."""
        sampled, tokens, logprobs, entropies = launched.result()
        self.stats["steps"] += 1
        for c in chunks:
            c.seq.num_computed = c.start + c.num_tokens
            refed = sum(1 for s in c.slots if s < 0)
            if self._written_ahead and self._written_ahead.pop(c.seq.seq_id, None) == c.start and c.slots[0] < 0:
                refed -= 1
            self.stats["refed_tokens"] += refed
            kind = "decode_tokens" if c.num_tokens == 1 and c.samples else "prefill_tokens"
            self.stats[kind] += c.num_tokens - refed
        outputs = []
        for chunk, tok, lp, ent in zip(sampled, tokens, logprobs, entropies):
            seq = chunk.seq
            seq.append_sampled(tok, lp, ent)
            outputs.append(StepOutput(seq.seq_id, tok, lp, ent))
            self._check_stop(seq, outputs[-1])
        return outputs

    def fork(self, seq_id: int, n: int = 1, at: int | None = None, seeds: list[int] | None = None,
             params: SamplingParams | None = None) -> list[int]:
        """`n` children of a sequence holding its first `at` tokens (default: all), sharing its cache blocks.

        Children sample independently (seeds derived from the parent's unless given) with `params` (default: the
        parent's) and are queued to continue from position `at`; the parent is untouched.
        """
        parent = self._get(seq_id)
        at = parent.num_tokens if at is None else int(at)
        if not parent.prompt_len <= at <= parent.num_tokens:
            raise ValueError(f"fork at={at} is outside sequence {seq_id}'s output range "
                             f"[{parent.prompt_len}, {parent.num_tokens}]")
        if n < 1:
            raise ValueError(f"fork needs n >= 1 children, got {n}")
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"fork got {len(seeds)} seeds for {n} children")
        self.sync()
        cached = min(at, self.block_manager.num_tokens(seq_id)) if self.block_manager.has(seq_id) else 0
        cached = min(cached, parent.num_computed)
        children = []
        for i in range(n):
            child_id = next(self._ids)
            if cached:
                self.block_manager.fork(seq_id, child_id, at=cached)
            out = at - parent.prompt_len
            seed = seeds[i] if seeds is not None else mix_seed(parent.seed, child_id)
            child = Sequence(child_id, parent.token_ids[:at], parent.prompt_len, params or parent.params, int(seed),
                             next(self._arrivals),
                             status=SequenceStatus.RUNNING if cached else SequenceStatus.WAITING,
                             num_computed=min(cached, at - 1),
                             num_sampled=sum(parent.out_sampled[:out]),
                             out_logprobs=parent.out_logprobs[:out], out_entropies=parent.out_entropies[:out],
                             out_sampled=parent.out_sampled[:out])
            self.seqs[child_id] = child
            children.append(child_id)
        return children

    def extend(self, seq_id: int, token_ids: list[int], max_tokens: int | None = None,
               params: SamplingParams | None = None) -> None:
        """Append given tokens (a tool result) to a stopped sequence; it resumes sampling after them.

        `params` replaces the sequence's sampling parameters from here on, and `max_tokens` its budget of sampled
        tokens (appended tokens never count)."""
        seq = self._get(seq_id)
        if seq.status != SequenceStatus.STOPPED:
            raise ValueError(f"extend: sequence {seq_id} is {seq.status.value}; only a stopped sequence can be "
                             "extended")
        token_ids = [int(t) for t in token_ids]
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"extend: a token id is out of range for vocabulary size {vocab}")
        if seq.num_tokens + len(token_ids) >= self.max_model_len:
            raise ValueError(f"extend: sequence {seq_id} would reach {seq.num_tokens + len(token_ids)} tokens, "
                             f"max_model_len is {self.max_model_len}")
        self.sync()
        seq.append_given(token_ids)
        if params is not None:
            seq.params = params
        if max_tokens is not None:
            seq.params = replace(seq.params, max_tokens=max_tokens)
        seq.finish_reason = seq.stop_reason = None
        seq.status = SequenceStatus.RUNNING if self.block_manager.has(seq_id) else SequenceStatus.WAITING

    def resume(self, seq_id: int, max_tokens: int | None = None) -> None:
        """Let a stopped sequence sample again (optionally with a new max_tokens budget), without new tokens."""
        seq = self._get(seq_id)
        if seq.status != SequenceStatus.STOPPED:
            raise ValueError(f"resume: sequence {seq_id} is {seq.status.value}, not stopped")
        self.sync()
        if max_tokens is not None:
            seq.params = replace(seq.params, max_tokens=max_tokens)
        seq.finish_reason = seq.stop_reason = None
        seq.status = SequenceStatus.RUNNING if self.block_manager.has(seq_id) else SequenceStatus.WAITING

    def release(self, seq_id: int) -> Sequence:
        """Forget a sequence and free its cache blocks; returns its final state."""
        if seq_id not in self.seqs:
            raise KeyError(f"release: unknown sequence id {seq_id}")
        if self._ahead is not None and any(c.seq.seq_id == seq_id for c in self._ahead[0]):
            self.sync()  # a stopped sequence is never in the step ahead: releasing it changes nothing there
        seq = self.seqs.pop(seq_id)
        self._written_ahead.pop(seq_id, None)
        if self.block_manager.has(seq_id):
            self.block_manager.free(seq_id)
        return seq

    def sequence(self, seq_id: int) -> Sequence:
        return self._get(seq_id)

    def has_unfinished(self) -> bool:
        return any(s.status != SequenceStatus.STOPPED for s in self.seqs.values())

    # --- the high-level API ----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[Completion]:
        """Generate for every prompt to completion; results in prompt order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"generate got {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="seq")
        pending = set(ids)
        done: dict[int, Completion] = {}
        try:
            while pending:
                for out in self.step():
                    if out.finished and out.seq_id in pending:
                        pending.discard(out.seq_id)
                        done[out.seq_id] = self._finish(out.seq_id)  # frees its blocks for the others at once
                        if bar:
                            bar.update(1)
        finally:
            if bar:
                bar.close()
        return [done[sid] for sid in ids]

    def _finish(self, seq_id: int) -> Completion:
        seq = self.release(seq_id)
        text = self.tokenizer.decode(seq.token_ids[seq.prompt_len:]) if self.tokenizer else None
        return seq.completion(text)

    # --- internals -------------------------------------------------------------------------------------------
    def _may_complete_stop(self, token_id: int, stops: tuple[str, ...]) -> bool:
        """A cheap pre-check before `_match_stop` decodes the sequence's tail (twice) for every sampled token."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return _may_complete(piece, stops)

    def _get(self, seq_id: int) -> Sequence:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id}") from None

    def _check_stop(self, seq: Sequence, out: StepOutput) -> None:
        p = seq.params
        tok = out.token_id
        reason = stop = None
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            reason, stop = "stop", tok
        elif p.stop and self.tokenizer is not None and self._may_complete_stop(tok, p.stop):
            stop = _match_stop(self.tokenizer, seq, p.stop)
            reason = "stop" if stop is not None else None
        if reason is None and (seq.num_sampled >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            seq.status = SequenceStatus.STOPPED
            seq.finish_reason, seq.stop_reason = reason, stop
            out.finished, out.finish_reason, out.stop_reason = True, reason, stop


def _may_complete(piece: str, stops: tuple[str, ...]) -> bool:
    """Can a stop string end inside a token whose own text is `piece`? Only if the piece holds its last character:
    exact for ASCII last characters (byte-level tokens carry them whole); other last characters (and whitespace,
    which some tokenizers strip from a lone token) always answer maybe."""
    for s in stops:
        last = s[-1]
        if not last.isascii() or last.isspace() or last in piece:
            return True
    return False


def _match_stop(tokenizer, seq: Sequence, stops: tuple[str, ...]) -> str | None:
    """The stop string completed by the newest token, if any (decoding only a short tail of the output).

    A match must end inside the newest token's text, so a stop string already present before (in a tool result
    appended by `extend`, say) does not fire again, and one that ends mid-token still does.
    """
    longest = max(len(s) for s in stops)
    tail_tokens = seq.token_ids[max(seq.prompt_len, seq.num_tokens - longest - 4):]
    tail, before = tokenizer.decode(tail_tokens), tokenizer.decode(tail_tokens[:-1])
    for s in stops:
        if s in tail and tail.count(s) > before.count(s):
            return s
    return None
