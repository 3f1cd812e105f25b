"""Prompts for training and evaluation: the embedded task or JSONL / parquet files, encoded one way everywhere.

Rows hold `prompt` (text, or a list of chat messages `{role, content}`), `answer` (string, number or list of
strings) and `data_source`; other fields go to the reward as `**row`. The fields are named by `data.*_key`, a
key or a dotted path into nested objects (`reward_model.ground_truth`). verl's row schema — the one the ARPO
reference's parquet files use: `prompt` as chat messages, `reward_model: {ground_truth, style}`, `data_source`,
`extra_info` — is recognised as it is: with the default `data.answer_key`, a row without `answer` takes its answer
from `reward_model.ground_truth` (a verl `{"target": [...]}` ground truth gives its targets). A malformed row
raises `DataError` naming the file, the row and the field. Prompts are encoded by `encode_prompt`: the
tokenizer's chat template when it has one and `data.chat_template` is on (with `data.system_prompt` first and the
generation prompt appended), otherwise the raw text with the tokenizer's BOS in front when it has one. SFT, RL
and evaluation all use it, so the model sees the same prompt format in all three.

`PromptSampler` gives the prompts of step s as a pure function of (seed, s): epoch e = ⌊s·B / N⌋ is a
permutation seeded by (seed, e). A resumed run therefore needs no sampler state to continue exactly.
"""
from __future__ import annotations

import json
import os
import random

from arpo.jsonl import read_jsonl
from arpo.rollout.prompts import PromptInput


class DataError(ValueError):
    """A data file or row cannot be used; the message names the file and row."""


# ---------------------------------------------------------------------------------------------------- rows
def _read_rows(path: str) -> list[tuple[int, dict]]:
    """(row number, row) of a JSONL, JSON-list or parquet file."""
    if path.lower().endswith(".parquet"):
        import datasets

        try:
            return list(enumerate(datasets.Dataset.from_parquet(path), 1))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: cannot read parquet ({type(exc).__name__}: {exc})") from None
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        return list(enumerate(data, 1))
    return read_jsonl(path, DataError)


def _check_prompt(prompt, where: str):
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        return prompt
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: chat message {i} must be an object with string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: the prompt must be a non-empty string or a list of chat messages")


def _check_answer(answer, where: str):
    if isinstance(answer, dict) and "target" in answer:  # verl's search ground truth: {"target": [...]}
        answer = answer["target"]
    if isinstance(answer, bool) or answer is None:
        raise DataError(f"{where}: 'answer' must be a string, a number or a list of strings, got {answer!r}")
    if isinstance(answer, (int, float)):
        return str(answer)
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (list, tuple)) and answer and all(isinstance(a, (str, int, float)) for a in answer):
        return [str(a) for a in answer]
    raise DataError(f"{where}: 'answer' must be a string, a number or a non-empty list of strings, got {answer!r}")


_MISSING = object()
DEFAULT_ANSWER_KEY = "answer"
VERL_ANSWER_KEY = "reward_model.ground_truth"  # where a verl-format row keeps its answer


def lookup(row: dict, key: str):
    """`row[key]`, else the dotted path `key` through nested objects; `_MISSING` when neither exists."""
    if key in row:
        return row[key]
    value = row
    for part in key.split("."):
        if not (isinstance(value, dict) and part in value):
            return _MISSING
        value = value[part]
    return value


def _answer_keys(section) -> tuple[str, ...]:
    """Where a row's answer may be: the configured key, and verl's place when the key is the default."""
    if section.answer_key == DEFAULT_ANSWER_KEY:
        return (DEFAULT_ANSWER_KEY, VERL_ANSWER_KEY)
    return (section.answer_key,)


def _field(row: dict, keys: tuple[str, ...], where: str):
    for key in keys:
        value = lookup(row, key)
        if value is not _MISSING:
            return value
    raise DataError(f"{where}: missing field {' or '.join(keys)} (have {', '.join(map(str, row))})")


def load_rows(path: str, section) -> list[dict]:
    """Validated `{prompt, answer, data_source, **extra}` rows of one file (fields found by data.*_key)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    out = []
    for i, row in _read_rows(path):
        where = f"{path}, row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        prompt = _field(row, (section.prompt_key,), where)
        answer = _field(row, _answer_keys(section), where)
        source = lookup(row, section.data_source_key)
        source = "" if source is _MISSING else source
        if not isinstance(source, str):
            raise DataError(f"{where}: '{section.data_source_key}' must be a string")
        extra = {k: v for k, v in row.items() if k not in (section.prompt_key, section.answer_key,
                                                           section.data_source_key)}
        out.append(dict(extra, prompt=_check_prompt(prompt, where), answer=_check_answer(answer, where),
                        data_source=source))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def embedded_rows(section, split: str, n: int, seed: int) -> list[dict]:
    from arpo.data import task_examples

    exs = task_examples(section, n, split, seed)
    return [dict(ex.meta, prompt=ex.prompt, answer=ex.answer, data_source=ex.data_source) for ex in exs]


def train_rows(cfg) -> list[dict]:
    d = cfg.data
    if not d.train_files:
        return embedded_rows(d, "train", d.embedded_train_size, cfg.train.seed)
    return [r for f in d.train_files for r in load_rows(f, d)]


def eval_rows(cfg) -> list[dict]:
    """Held-out rows (the embedded held-out split is fixed: seed 0, whatever train.seed is)."""
    d = cfg.data
    if d.eval_files:
        rows = [r for f in d.eval_files for r in load_rows(f, d)]
    elif d.train_files:
        rows = []
    else:
        rows = embedded_rows(d, "heldout", d.embedded_eval_size, 0)
    return rows[: d.max_eval_examples] if d.max_eval_examples else rows


# ---------------------------------------------------------------------------------------------------- encoding
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt, section, protocol=None) -> list[int]:
    """Token ids of a prompt (text or chat messages) as the policy sees it; a tool `protocol`
    (`arpo.tools.protocol`) renders the chat template its way (hermes: with the tools' schemas). The one place
    prompts meet the chat template: the section's template variables (`data.enable_thinking`) go in here."""
    if section.chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if section.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": section.system_prompt}] + messages
        kw = section.template_kwargs()  # data.enable_thinking
        if protocol is not None:
            return protocol.render_prompt(tokenizer, messages, **kw)
        from arpo.tools.protocol import template_ids

        return template_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw))
    if getattr(protocol, "needs_chat_template", False):
        raise DataError(f"tools.protocol={protocol.name} shows the tools through the chat template: it needs a "
                        "tokenizer with one and data.chat_template=true")
    if not isinstance(prompt, str):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([int(bos)] if bos is not None else []) + [int(t) for t in ids]


def prompt_inputs(rows: list[dict], tokenizer, section, protocol=None) -> list[PromptInput]:
    """Rows → rollout inputs (rendered for the tool `protocol`); prompts longer than data.max_prompt_tokens are
    dropped."""
    out = []
    for row in rows:
        ids = encode_prompt(tokenizer, row["prompt"], section, protocol)
        if len(ids) > section.max_prompt_tokens:
            continue
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "data_source")}
        text = row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"])
        out.append(PromptInput(ids, text, row["answer"], row["data_source"], extra))
    if rows and not out:
        raise DataError(f"every prompt is longer than data.max_prompt_tokens={section.max_prompt_tokens}")
    return out


# ---------------------------------------------------------------------------------------------------- order
class PromptSampler:
    """Prompts of step s: a stateless function of (seed, step), reshuffled every epoch (or in file order)."""

    def __init__(self, items: list, batch_size: int, seed: int, shuffle: bool = True):
        if not items:
            raise DataError("no training prompts")
        self.items, self.batch_size, self.seed, self.shuffle = items, batch_size, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.items)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch]

    def batch(self, step: int) -> list:
        """The batch of 0-based `step`."""
        n, out = len(self.items), []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self.items[self._perm(k // n)[k % n]])
        return out
