"""The one configuration tree of `arpo train / sft / eval`: typed dataclasses with help text on every field.

Defaults are the reference hyper-parameters of ../shared/ARPO.md §2–§4; `arpo/configs/embedded.yaml` (what
`arpo train` runs without a file) shrinks them to a CPU-sized run. A run is described by a YAML file of nested
sections plus command-line overrides:

    arpo train arpo/configs/qwen2.5-3b-h100.yaml model.path=/models/qwen3b rollout.leaves=8 algo=grpo

Override values follow YAML scalar rules and are typed against the field (`true`, `3`, `1e-6`, `null`,
`[python, search]` or `python,search`); `SECTION=value` is short for `SECTION.name=value` (`algo=grpo`).
Unknown keys and bad values raise `ConfigError` naming the field, the valid keys or choices, and a close match.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import textwrap
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
EMBEDDED_CONFIG = os.path.join(CONFIG_DIR, "embedded.yaml")
BUILTIN_TOOLS = ("python", "search")
BUILTIN_REWARDS = ("arpo", "embedded", "f1", "exact_match")
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


def opt(default: Any, help: str, **bounds: float) -> Any:
    """A field with help text and optional numeric bounds (ge, gt, le, lt) checked on load."""
    meta = {"help": help, **bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    """The policy model."""

    path: str = opt("embedded", "local Hugging Face Qwen2/Qwen2.5 directory (config.json + safetensors + tokenizer), "
                    "or 'embedded': create (or reuse) the tiny character-level model in the run directory")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "parameter dtype; auto = float32 on CPU, the checkpoint's dtype (bfloat16 if unset) on CUDA")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (auto = cuda when available)")
    gradient_checkpointing: bool = opt(False, "recompute decoder-layer activations in backward to save memory")
    embedded_hidden_size: int = opt(128, "embedded model: hidden size", gt=0)
    embedded_layers: int = opt(4, "embedded model: decoder layers", gt=0)
    embedded_heads: int = opt(4, "embedded model: attention heads", gt=0)
    embedded_kv_heads: int = opt(2, "embedded model: key/value heads (GQA)", gt=0)
    embedded_intermediate_size: int = opt(384, "embedded model: MLP width", gt=0)


@dataclass
class DataSection:
    """Training and evaluation prompts."""

    train_files: list[str] = opt([], "JSONL or parquet files of {prompt, answer, data_source}; empty = the "
                                 "embedded task")
    eval_files: list[str] = opt([], "held-out files in the same format; empty = the embedded task's held-out split")
    prompt_key: str = opt("prompt", "field holding the prompt (text, or a list of chat messages)")
    answer_key: str = opt("answer", "field holding the ground-truth answer (string or list of strings)")
    data_source_key: str = opt("data_source", "field naming the data source (selects reward rules, e.g. math)")
    max_prompt_tokens: int = opt(2048, "prompts longer than this (in tokens, after the chat template) are skipped",
                                 gt=0)
    chat_template: bool = opt(True, "apply the tokenizer's chat template when it has one")
    system_prompt: Optional[str] = opt(None, "system message put before each prompt when the chat template is "
                                       "used; null = none")
    shuffle: bool = opt(True, "shuffle training prompts each epoch (seeded by train.seed)")
    max_eval_examples: Optional[int] = opt(None, "evaluate on at most this many held-out rows; null = all", gt=0)
    embedded_train_size: int = opt(4096, "embedded task: number of training questions", gt=0)
    embedded_eval_size: int = opt(64, "embedded task: number of held-out questions", gt=0)
    embedded_lookup_fraction: float = opt(0.0, "embedded task: share of two-hop search questions (rest: arithmetic)",
                                          ge=0, le=1)


@dataclass
class RolloutSection:
    """Entropy-adaptive tree rollout (ARPO.md §2) and sampling."""

    mode: Literal["auto", "tree", "trajectory"] = opt(
        "auto", "tree = ARPO entropy-branching trees; trajectory = independent samples (GRPO baseline); "
        "auto = tree for algo.name=arpo, trajectory for grpo")
    leaves: int = opt(16, "M: trajectories (leaves) per prompt; every prompt yields exactly M", gt=0)
    initial: int = opt(8, "N: global samples started per prompt before branching (<= leaves)", gt=0)
    beam: int = opt(1, "Z: children forked per branching decision", gt=0)
    alpha: float = opt(0.5, "branch probability base: P = alpha + beta * dH", ge=0, le=1)
    beta: float = opt(0.2, "weight of the normalised entropy rise dH in P", ge=0)
    tau: float = opt(0.5, "threshold rule: branch when P > tau", ge=0, le=1)
    probe_tokens: int = opt(20, "k: tokens whose mean entropy gives H_init and H_t", gt=0)
    branch_rule: Literal["threshold", "bernoulli"] = opt(
        "threshold", "threshold = paper (branch iff P > tau); bernoulli = reference code (branch w.p. clip(P, 0, 1))")
    max_tool_calls: int = opt(3, "tool calls per trajectory; later calls are not run", ge=0)
    max_response_tokens: int = opt(4096, "cap on generated + tool-result tokens per trajectory", gt=0)
    temperature: float = opt(1.0, "sampling temperature", gt=0)
    top_p: float = opt(1.0, "nucleus sampling mass (1 = off)", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0 = off)", ge=0)
    aepo_dynamic_budget: bool = opt(False, "AEPO: size the global sample count from a pre-sampled trajectory's "
                                    "root vs tool entropy")
    aepo_branch_penalty: bool = opt(False, "AEPO: damp P after consecutive high-entropy branches")
    aepo_penalty_rate: float = opt(0.05, "AEPO: P *= max(0, 1 - rate * consecutive)", ge=0)


@dataclass
class ToolsSection:
    """Tools the policy may call."""

    enabled: list[str] = opt(["python", "search"], "tool names (python, search) or 'pkg.module:ToolClass'")
    python_timeout_s: float = opt(10.0, "python sandbox: wall-clock limit per call (s)", gt=0)
    python_memory_mb: int = opt(1024, "python sandbox: address-space limit per call (MiB)", gt=0)
    search_corpus: Optional[str] = opt(None, "search: local JSONL corpus of {title, text}; null = the bundled "
                                       "embedded corpus")
    search_url: Optional[str] = opt(None, "search: HTTP retriever URL (used instead of the local corpus when set)")
    search_protocol: Literal["arpo", "retriever"] = opt(
        "arpo", "search: the service's protocol; arpo = POST {query, top_k}; retriever = Search-R1's retrieval "
        "server (url ends in /retrieve; POST {queries, topk, return_scores}, a step's queries in one request)")
    search_top_k: int = opt(3, "search: passages returned per query", gt=0)
    max_result_chars: int = opt(3000, "tool output longer than this is truncated (head and tail kept)", gt=0)
    workers: int = opt(8, "tool calls run concurrently in a pool of this many workers", gt=0)


@dataclass
class RewardSection:
    """How a finished trajectory is scored."""

    name: str = opt("arpo", "built-in reward (arpo, embedded, f1, exact_match) or 'pkg.module:function'")


@dataclass
class AlgoSection:
    """Advantages and the clipped policy loss (ARPO.md §3, §6)."""

    name: Literal["arpo", "grpo"] = opt("arpo", "arpo = tree rollouts + attribution; grpo = independent "
                                        "trajectories (baseline)")
    attribution: Literal["soft", "hard"] = opt(
        "soft", "shared tokens: soft = once per leaf with its advantage; hard = once, with the mean advantage")
    clip_low: float = opt(0.2, "PPO ratio lower clip: 1 - clip_low", ge=0, lt=1)
    clip_high: float = opt(0.2, "PPO ratio upper clip: 1 + clip_high", ge=0)
    dual_clip: Optional[float] = opt(3.0, "dual-clip bound c for negative advantages (> 1); null = off", gt=1)
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = opt(
        "token-mean", "how token losses are averaged into the batch loss")
    kl_coef: float = opt(0.0, "KL penalty to a frozen reference model (> 0 loads one)", ge=0)
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    ppo_epochs: int = opt(1, "passes over each rollout batch", gt=0)
    adv_eps: float = opt(1e-6, "epsilon in (r - mean) / (std + eps)", gt=0)
    aepo_entropy_clip: bool = opt(False, "AEPO entropy-balanced clipping: upper bound (1+eps)/sg(r)*r keeps gradient")
    aepo_entropy_advantage: bool = opt(False, "AEPO entropy-aware advantage: A *= 1 + coef * z(H)")
    aepo_entropy_adv_coef: float = opt(0.2, "AEPO: coef of the entropy z-score in the advantage", ge=0)


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule."""

    lr: float = opt(1e-6, "peak learning rate", gt=0)
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay", ge=0)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas [beta1, beta2]")
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = opt(0, "linear warm-up steps from 0 to lr", ge=0)
    schedule: Literal["constant", "cosine"] = opt("constant", "learning rate after warm-up")
    min_lr_ratio: float = opt(0.0, "cosine: final lr as a fraction of lr", ge=0, le=1)
    grad_clip: Optional[float] = opt(1.0, "max global gradient norm; null = no clipping", gt=0)


@dataclass
class TrainSection:
    """The RL loop, evaluation, checkpoints."""

    steps: int = opt(200, "policy-update steps (one rollout batch each)", gt=0)
    batch_prompts: int = opt(128, "prompts per rollout batch", gt=0)
    mini_batch_prompts: int = opt(16, "prompts per optimizer step (divides batch_prompts)", gt=0)
    micro_batch_tokens: int = opt(16384, "packed tokens per forward/backward pass (gradients accumulate over a "
                                  "mini-batch); lower it if memory runs out", gt=0)
    seed: int = opt(0, "seed of every random generator (data order, sampling, init)")
    bf16: bool = opt(True, "bfloat16 autocast for training on CUDA (ignored on CPU)")
    threads: int = opt(0, "torch CPU threads (0 = leave torch's default)", ge=0)
    eval_every: int = opt(0, "evaluate held-out accuracy every N steps and at the end (0 = only at the end)", ge=0)
    eval_temperature: float = opt(0.0, "sampling temperature for evaluation (0 = greedy)", ge=0)
    eval_samples: int = opt(1, "samples per held-out question (pass@k uses k = this)", gt=0)
    save_every: int = opt(50, "write a checkpoint every N steps and at the end (0 = only at the end)", ge=0)
    keep_last: int = opt(3, "checkpoints kept in run_dir (older step_* dirs are deleted; 0 = keep all)", ge=0)
    run_dir: str = opt("runs/arpo", "where checkpoints, metrics.jsonl, plots and config.yaml go")
    resume: Optional[str] = opt(None, "null = start fresh; 'latest' = newest checkpoint in run_dir; or a "
                                "checkpoint directory")


@dataclass
class LogSection:
    """Where metrics go besides run_dir/metrics.jsonl."""

    tensorboard: bool = opt(False, "write TensorBoard scalars to run_dir/tensorboard (needs tensorboard)")
    wandb: bool = opt(False, "log to Weights & Biases (needs wandb; skipped with a warning if missing)")
    wandb_project: str = opt("arpo", "W&B project")
    wandb_run_name: Optional[str] = opt(None, "W&B run name; null = the run directory's name")
    progress_bar: bool = opt(True, "show a progress bar with reward, accuracy and tokens/s")


@dataclass
class SftSection:
    """Cold-start supervised fine-tuning on tool-use traces (loss on the model's own tokens only)."""

    steps: int = opt(0, "SFT steps before RL (0 = none)", ge=0)
    lr: float = opt(1e-5, "SFT learning rate (AdamW, optim.weight_decay and grad_clip apply)", gt=0)
    batch_size: int = opt(32, "traces per SFT step", gt=0)
    train_files: list[str] = opt([], "JSONL traces; empty = demonstrations of the embedded task")
    max_tokens: int = opt(4096, "traces longer than this are truncated", gt=0)
    stop_loss: Optional[float] = opt(None, "stop SFT once the running loss (EMA over ~20 steps, after >= 50 steps) "
                                           "is below this; null = run all sft.steps", gt=0)
    stop_accuracy: Optional[float] = opt(None, "stop SFT once the running share of training traces that greedy "
                                               "decoding reproduces (teacher-forced argmax; EMA over ~20 steps, "
                                               "after >= 50 steps) reaches this; null = off", gt=0, le=1)


@dataclass
class Config:
    """Everything a run needs; `config_to_yaml` / `load_config` round-trip it."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    tools: ToolsSection = field(default_factory=ToolsSection)
    reward: RewardSection = field(default_factory=RewardSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    sft: SftSection = field(default_factory=SftSection)

    @property
    def rollout_mode(self) -> str:
        """'tree' or 'trajectory', resolving rollout.mode=auto from algo.name."""
        if self.rollout.mode != "auto":
            return self.rollout.mode
        return "trajectory" if self.algo.name == "grpo" else "tree"

    @property
    def embedded_task(self) -> bool:
        return not self.data.train_files


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
_NULL_WORDS = ("null", "none", "~", "")


# ---------------------------------------------------------------------------------------------------- typing
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(what: str, name: str, valid) -> ConfigError:
    return ConfigError(f"unknown {what} {name!r}{_suggest(name, valid)}; valid: {', '.join(valid)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, text: str | None = None) -> Any:
    """`value` (from YAML, or parsed from the override `text`) converted to the field type `tp`, or ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (text is not None and text.strip().lower() in _NULL_WORDS):
            return None
        return _coerce(value, inner[0], where, text)
    if origin is Literal:
        if not isinstance(value, str):
            value = text.strip() if text is not None else str(value)
        if value not in args:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(args)}{_suggest(value, args)}")
        return value
    if origin is list:
        if isinstance(value, str):  # `a,b` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]", str(v) if isinstance(v, str) else None)
                for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {text if text is not None else value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {text if text is not None else value!r}")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-6` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {text if text is not None else value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if text is not None:  # `model.path=123`, `data.prompt_key=yes`: the literal text
            return text.strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _check_bounds(value: Any, meta, where: str) -> None:
    if value is None or isinstance(value, (list, str, bool)):
        return
    for key, ok, sign in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{where}={value!r}: must be {sign} {meta[key]}")


# ---------------------------------------------------------------------------------------------------- building
def _set_field(section_obj: Any, section: str, key: str, value: Any, text: str | None = None) -> None:
    valid = [f.name for f in fields(section_obj)]
    if key not in valid:
        raise _unknown(f"key in section '{section}':", key, valid)
    tp = _hints(type(section_obj))[key]
    setattr(section_obj, key, _coerce(value, tp, f"{section}.{key}", text))


def _apply_section(cfg: Config, section: str, body: Any, text: str | None = None) -> None:
    if section not in SECTIONS:
        raise _unknown("config section", section, list(SECTIONS))
    obj = getattr(cfg, section)
    if body is None:
        return
    if isinstance(body, dict):
        for key, value in body.items():
            _set_field(obj, section, str(key), value)
    elif "name" in {f.name for f in fields(obj)}:  # `algo: grpo` / `algo=grpo` -> algo.name
        _set_field(obj, section, "name", body, text)
    else:
        raise ConfigError(f"section '{section}' must be a mapping of keys "
                          f"({', '.join(f.name for f in fields(obj))}), got {body!r}")


def config_from_dict(d: dict | None) -> Config:
    """A validated Config from nested `{section: {key: value}}`; missing keys keep their defaults."""
    cfg = Config()
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(d).__name__}")
    for section, body in d.items():
        _apply_section(cfg, str(section), body)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def apply_overrides(cfg: Config, overrides) -> Config:
    """Apply `section.key=value` / `section=name` strings in place; returns cfg (not yet validated)."""
    for item in overrides or ():
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (or section=name)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        section, dot, name = key.partition(".")
        if dot:
            if section not in SECTIONS:
                raise _unknown("config section", section, list(SECTIONS))
            _set_field(getattr(cfg, section), section, name, value, text)
        else:
            _apply_section(cfg, section, value, text)
    return cfg


def load_config(path: str | None = None, overrides=()) -> Config:
    """The Config of `path` (YAML; None = the packaged embedded default) with `overrides` applied, validated."""
    path = EMBEDDED_CONFIG if path is None else path
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------- validation
def _check_names(where: str, names, builtin) -> None:
    for name in names:
        if name not in builtin and ":" not in name and "." not in name:
            raise ConfigError(f"{where}: unknown {name!r}{_suggest(name, builtin)}; expected one of "
                              f"{', '.join(builtin)} or 'pkg.module:object'")


def _check_files(where: str, files) -> None:
    for f in files:
        if not f.lower().endswith(DATA_EXTENSIONS):
            raise ConfigError(f"{where}: {f!r} must end with one of {', '.join(DATA_EXTENSIONS)}")


def validate(cfg: Config) -> Config:
    """Type, range and cross-field checks; raises ConfigError naming the field. Returns cfg."""
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        if not isinstance(obj, cls):
            raise ConfigError(f"section '{section}' must be a {cls.__name__}, got {type(obj).__name__}")
        hints = _hints(cls)
        for f in fields(obj):
            where = f"{section}.{f.name}"
            value = _coerce(getattr(obj, f.name), hints[f.name], where)
            _check_bounds(value, f.metadata, where)
    r, t, o = cfg.rollout, cfg.train, cfg.optim
    if r.initial > r.leaves:
        raise ConfigError(f"rollout.initial={r.initial} must be <= rollout.leaves={r.leaves}")
    if t.mini_batch_prompts > t.batch_prompts or t.batch_prompts % t.mini_batch_prompts:
        raise ConfigError(f"train.mini_batch_prompts={t.mini_batch_prompts} must divide "
                          f"train.batch_prompts={t.batch_prompts}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.model.device):
        raise ConfigError(f"model.device={cfg.model.device!r}: expected auto, cpu, cuda or cuda:N")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas}: expected two numbers in [0, 1)")
    _check_names("tools.enabled", cfg.tools.enabled, BUILTIN_TOOLS)
    if len(set(cfg.tools.enabled)) != len(cfg.tools.enabled):
        raise ConfigError(f"tools.enabled={cfg.tools.enabled}: a tool is listed twice")
    if cfg.tools.search_protocol != "arpo" and not cfg.tools.search_url:
        raise ConfigError(f"tools.search_protocol={cfg.tools.search_protocol} needs tools.search_url (the "
                          "server's /retrieve URL)")
    _check_names("reward.name", [cfg.reward.name], BUILTIN_REWARDS)
    _check_files("data.train_files", cfg.data.train_files)
    _check_files("data.eval_files", cfg.data.eval_files)
    _check_files("sft.train_files", cfg.sft.train_files)
    for where, value in (("model.path", cfg.model.path), ("train.run_dir", t.run_dir),
                         ("log.wandb_project", cfg.log.wandb_project)):
        if not value.strip():
            raise ConfigError(f"{where} must not be empty")
    return cfg


def check_paths(cfg: Config) -> None:
    """Files the run will read exist (kept apart from `validate` so configs can be printed anywhere)."""
    if cfg.model.path != "embedded" and not os.path.isdir(cfg.model.path):
        raise ConfigError(f"model.path={cfg.model.path!r}: no such directory (a local Hugging Face model dir)")
    for where, files in (("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files),
                         ("sft.train_files", cfg.sft.train_files)):
        for f in files:
            if not os.path.isfile(f):
                raise ConfigError(f"{where}: no such file {f!r}")
    if cfg.tools.search_corpus and not os.path.isfile(cfg.tools.search_corpus):
        raise ConfigError(f"tools.search_corpus: no such file {cfg.tools.search_corpus!r}")


# ---------------------------------------------------------------------------------------------------- YAML out
def _yaml_value(value: Any) -> str:
    """One YAML flow value on one line (strings quoted as needed, lists as [a, b])."""
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar; keeps the value on one line
    text = yaml.safe_dump([value], default_flow_style=True, width=10**9, allow_unicode=True).strip()
    return text[1:-1]  # drop the wrapping list's brackets


def config_to_yaml(cfg: Config, comments: bool = True) -> str:
    """YAML of every field (loadable by `load_config`); with `comments`, each field's help above it."""
    out = []
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        if comments:
            out.append(f"# {(cls.__doc__ or '').strip()}")
        out.append(f"{section}:")
        for f in fields(obj):
            if comments:
                out += textwrap.wrap(f.metadata["help"], 110, initial_indent="  # ", subsequent_indent="  # ")
            out.append(f"  {f.name}: {_yaml_value(getattr(obj, f.name))}")
        out.append("")
    return "\n".join(out)


__all__ = ["Config", "ConfigError", "SECTIONS", "EMBEDDED_CONFIG", "CONFIG_DIR", "load_config", "apply_overrides",
           "config_from_dict", "config_to_dict", "config_to_yaml", "validate", "check_paths"] + \
          [cls.__name__ for cls in SECTIONS.values()]
