"""What the rollout takes per prompt: token ids plus what the reward needs (answer, data source, the row).

The rollout is token-in, token-out: prompts arrive as ids (the data layer applies chat templates). For
convenience `as_prompt_inputs` also accepts `arpo.data.Example`s, dicts with a `prompt` text, plain strings or
id lists, encoding text with the tokenizer as is (`tokenizer.encode(text)`, the tokenizer's own special tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class PromptInput:
    prompt_ids: list[int]
    prompt: str = ""
    answer: Any = ""
    data_source: str = ""
    row: dict = field(default_factory=dict)   # extra fields passed to the reward function


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer (give the engine one, or pass token ids)")
    return list(tokenizer.encode(text))


def as_prompt_input(item, tokenizer=None) -> PromptInput:
    if isinstance(item, PromptInput):
        return item
    if isinstance(item, str):
        return PromptInput(_encode(tokenizer, item), item)
    if isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
        return PromptInput([int(t) for t in item])
    if isinstance(item, dict):
        row = dict(item)
        ids = row.pop("prompt_ids", None)
        text = row.pop("prompt", "")
        if ids is None:
            ids = _encode(tokenizer, text)
        return PromptInput(list(ids), text, row.pop("answer", ""), row.pop("data_source", ""), row)
    if hasattr(item, "prompt") and hasattr(item, "answer"):  # arpo.data.Example
        return PromptInput(_encode(tokenizer, item.prompt), item.prompt, item.answer,
                           getattr(item, "data_source", ""), dict(getattr(item, "meta", {}) or {}))
    raise TypeError(f"cannot make a rollout prompt from {type(item).__name__}: pass PromptInput, Example, dict, "
                    "str or a list of token ids")


def as_prompt_inputs(items: Iterable, tokenizer=None) -> list[PromptInput]:
    return [as_prompt_input(it, tokenizer) for it in items]
