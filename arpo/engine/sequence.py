"""What the engine knows about one request: its tokens, where it is in the cache, how to sample, when to stop.

A sequence's `token_ids` hold the prompt, every sampled token and every token appended by `extend` (tool
results), in order. `num_computed` counts the leading tokens the model has already processed; the next forward
feeds `token_ids[num_computed:]`. The block manager separately knows how many tokens have a cache slot: a token
can have a slot without being "computed" (a forked child re-feeds its last shared token to get logits — its K/V
is already in the cache, so it is written nowhere).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

_MASK64 = (1 << 64) - 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # has tokens to feed but no cache blocks yet (new, or preempted)
    RUNNING = "running"    # holds blocks; fed every step until it stops
    STOPPED = "stopped"    # finished sampling; keeps its blocks until released (it may be extended or forked)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. temperature 0 = greedy; top_k 0 = off; top_p 1 = off.

    `max_tokens` caps the tokens this request samples (tokens appended by `extend` do not count).
    `stop_token_ids` end it when sampled (the checkpoint's EOS ids are added by the engine unless `ignore_eos`).
    `stop` strings end it when the decoded output ends with one (the engine refuses them without a tokenizer).
    `seed` makes sampling reproducible per request whatever else is in the batch.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        # Accept lists from callers while keeping the dataclass hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not (self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    """The result of one request of `LLMEngine.generate`: the generated tokens with their statistics."""
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str          # "stop" (stop token or string) | "length" (max_tokens or max_model_len)
    stop_reason: int | str | None = None
    text: str | None = None


@dataclass
class StepOutput:
    """One token sampled for one sequence in one `step()`; `finished` says the sequence stopped on it."""
    seq_id: int
    token_id: int
    logprob: float
    entropy: float
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def mix_seed(seed: int, salt: int) -> int:
    """A child's seed from its parent's: splitmix64, so siblings sample independently but reproducibly."""
    z = (seed + 0x9E3779B97F4A7C15 * (salt + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass(eq=False)  # identity: the scheduler tests membership in lists of sequences every step
class Sequence:
    seq_id: int
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    seed: int
    arrival: int                     # order of admission, for FCFS scheduling and preemption (newest first)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    num_sampled: int = 0
    # Per output token (token_ids[prompt_len:]): sampled or appended, and the sampler's statistics.
    out_logprobs: list[float] = field(default_factory=list)
    out_entropies: list[float] = field(default_factory=list)
    out_sampled: list[bool] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    def append_sampled(self, token: int, logprob: float, entropy: float) -> None:
        self.token_ids.append(token)
        self.out_logprobs.append(logprob)
        self.out_entropies.append(entropy)
        self.out_sampled.append(True)
        self.num_sampled += 1

    def append_given(self, token_ids: list[int]) -> None:
        self.token_ids.extend(token_ids)
        self.out_logprobs.extend([0.0] * len(token_ids))
        self.out_entropies.extend([0.0] * len(token_ids))
        self.out_sampled.extend([False] * len(token_ids))

    def completion(self, text: str | None = None) -> Completion:
        return Completion(self.token_ids[self.prompt_len:], list(self.out_logprobs), list(self.out_entropies),
                          self.finish_reason or "length", self.stop_reason, text)
