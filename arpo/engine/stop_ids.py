"""Which token ids end a sequence: every end-of-sequence id the checkpoint declares, not just one.

Real checkpoints declare several. Qwen2.5-Instruct's `generation_config.json` lists `<|im_end|>` and
`<|endoftext|>`; Llama-3.x-Instruct's three ids; `config.json` holds an int or a list; the tokenizer names one
more. A model that ends with an id the engine does not know runs on to `max_tokens`, so the engine stops on the
union of all three, as transformers' `generate` does with the generation config's list:

    eos_ids(model.config, tokenizer)      # frozenset: generation_config.json ∪ config.json ∪ tokenizer.eos
    eos_ids(cfg, tok, explicit=[7, 9])    # an explicit int or list replaces the declared ones

`primary_eos` is the one id written where a sequence must end (the EOS appended to SFT traces): the tokenizer's,
else the generation config's first, else config.json's first.
"""
from __future__ import annotations

from typing import Iterable


def as_ids(value) -> tuple[int, ...]:
    """An `eos_token_id` field (absent, an int, or a list of ints) as a tuple of ids, in order."""
    if value is None:
        return ()
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"eos_token_id must be an int or a list of non-negative ints, got {value!r}")
    return tuple(int(v) for v in values)


def declared_eos(model_config, tokenizer=None) -> tuple[int, ...]:
    """The ids a checkpoint declares, generation config first, then config.json, then the tokenizer (no repeats).

    `model_config` is an `arpo.model.ModelConfig` (its `generation` and `raw` dicts hold the two files); any other
    config object contributes its `eos_token_id` attribute, if it has one."""
    generation = getattr(model_config, "generation", None) or {}
    raw = getattr(model_config, "raw", None)
    config_eos = raw.get("eos_token_id") if isinstance(raw, dict) else getattr(model_config, "eos_token_id", None)
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return _unique([*as_ids(generation.get("eos_token_id")), *as_ids(config_eos), *as_ids(tok_eos)])


def eos_ids(model_config, tokenizer=None, explicit=None) -> frozenset[int]:
    """The engine's stop set: `explicit` (int or list; `[]` = none) if given, else every declared id."""
    if explicit is not None:
        return frozenset(as_ids(explicit))
    return frozenset(declared_eos(model_config, tokenizer))


def primary_eos(model_config, tokenizer=None) -> int | None:
    """The id to write at the end of a sequence: the tokenizer's EOS, else the first declared one."""
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        return int(tok_eos)
    declared = declared_eos(model_config)
    return declared[0] if declared else None


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))
