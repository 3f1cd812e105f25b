"""The data's settings, declared once: training and held-out prompts (the `data` section of a run)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.settings import ConfigError, check_fields, check_files, opt

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclass
class DataConfig:
    """Training and evaluation prompts."""

    train_files: list[str] = opt([], "JSONL or parquet files of {prompt, answer, data_source} (or verl rows: "
                                 "reward_model.ground_truth as the answer); empty = the embedded task")
    eval_files: list[str] = opt([], "held-out files in the same format; empty = the embedded task's held-out split")
    prompt_key: str = opt("prompt", "field holding the prompt (text, or a list of chat messages); a key or a dotted "
                          "path into nested objects")
    answer_key: str = opt("answer", "field holding the ground-truth answer (string or list of strings), key or dotted "
                          "path; with this default a row without it uses verl's reward_model.ground_truth")
    data_source_key: str = opt("data_source", "field naming the data source (selects reward rules, e.g. math), key "
                               "or dotted path")
    max_prompt_tokens: int = opt(2048, "prompts longer than this (in tokens, after the chat template) are skipped",
                                 gt=0)
    chat_template: bool = opt(True, "apply the tokenizer's chat template when it has one")
    system_prompt: Optional[str] = opt(None, "system message put before each prompt when the chat template is "
                                       "used; null = none")
    enable_thinking: Optional[bool] = opt(
        None, "Qwen3's chat-template switch, passed to apply_chat_template wherever prompts and tool turns are "
        "rendered (rollout data, eval, SFT, serve, chat): false = non-thinking mode (the template opens each "
        "assistant turn with an empty <think></think>), true = thinking; null = not passed (the template's "
        "default; Qwen3: thinking). Needs data.chat_template=true")
    shuffle: bool = opt(True, "shuffle training prompts each epoch (seeded by train.seed)")
    max_eval_examples: Optional[int] = opt(None, "evaluate on at most this many held-out rows; null = all", gt=0)
    embedded_task: Literal["arith", "agent"] = opt(
        "arith", "embedded task: arith = the default (one python call per question, character tokenizer); agent = "
        "0-3 calls of python and search with distractor passages, word-level tokenizer (arpo.data.agent)")
    embedded_train_size: int = opt(4096, "embedded task: number of training questions", gt=0)
    embedded_eval_size: int = opt(64, "embedded task: number of held-out questions", gt=0)
    embedded_lookup_fraction: float = opt(0.0, "embedded arith task: share of two-hop search questions (rest: "
                                          "arithmetic)",
                                          ge=0, le=1)

    def __post_init__(self):
        self.check()

    def check(self, section: str = "data") -> "DataConfig":
        check_fields(self, section)
        check_files(f"{section}.train_files", self.train_files, DATA_EXTENSIONS)
        check_files(f"{section}.eval_files", self.eval_files, DATA_EXTENSIONS)
        if self.enable_thinking is not None and not self.chat_template:
            raise ConfigError(f"{section}.enable_thinking is a chat-template flag: it needs {section}.chat_template"
                              "=true")
        return self

    def template_kwargs(self) -> dict:
        """Extra variables for the tokenizer's chat template (`apply_chat_template(..., **kwargs)`)."""
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}


__all__ = ["DataConfig", "DATA_EXTENSIONS"]
