"""The run's configuration tree: it composes the settings each layer declares for itself, and reads it from YAML.

Every setting has one owner, the layer that uses it — `arpo/model/policy_config.py` (model),
`arpo/data/config.py` (data), `arpo/engine/config.py` (engine), `arpo/rollout/config.py` (rollout),
`arpo/tools/config.py` (tools), `arpo/rewards/config.py` (reward), `arpo/algo/config.py` (algo),
`arpo/trainer/config.py` (optim, train, log, sft) — with help text, bounds and its own checks; this module only
composes them, picks the run's defaults where they differ from a layer's (a run's rollout mode follows
algo.name; its engine takes a 20% KV-cache share), and checks what spans sections. Defaults are the reference
hyper-parameters of ../shared/ARPO.md §2–§4; `arpo/configs/embedded.yaml` (what `arpo train` runs without a file)
shrinks them to a CPU-sized run. A run is described by a YAML file of nested sections plus command-line overrides:

    arpo train arpo/configs/qwen2.5-3b-h100.yaml model.path=/models/qwen3b rollout.leaves=8 algo=grpo

Override values follow YAML scalar rules and are typed against the field (`true`, `3`, `1e-6`, `null`,
`[python, search]` or `python,search`); `SECTION=value` is short for `SECTION.name=value` (`algo=grpo`).
Unknown keys and bad values raise `ConfigError` naming the field, the valid keys or choices, and a close match.
Fields a layer marks `derived` (the engine's context length and seed) are set by the run builder from other
sections: they are not printed and cannot be overridden.
"""
from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from arpo.algo.config import AlgoConfig
from arpo.data.config import DATA_EXTENSIONS, DataConfig
from arpo.engine.config import EngineConfig
from arpo.model.policy_config import PolicyConfig
from arpo.rewards.config import RewardConfig
from arpo.rewards.reward import BUILTIN_REWARDS as REWARD_REGISTRY
from arpo.rollout.config import RolloutConfig
from arpo.settings import ConfigError, set_field, unknown
from arpo.tools.config import ToolsConfig
from arpo.tools.registry import BUILTIN_TOOLS as TOOL_REGISTRY
from arpo.trainer.config import LogConfig, OptimConfig, SftConfig, TrainConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
EMBEDDED_CONFIG = os.path.join(CONFIG_DIR, "embedded.yaml")


def _run_engine() -> EngineConfig:
    """A training run's engine: a 20% KV-cache share on CUDA (the optimiser's state is allocated after it), and
    no prefix caching (cached blocks would hold K/V computed with the weights of an earlier step)."""
    return EngineConfig(memory_fraction=0.2, enable_prefix_caching=False)


def _run_rollout() -> RolloutConfig:
    """A run's rollout: its mode follows algo.name unless set."""
    return RolloutConfig(mode="auto")


@dataclass
class Config:
    """Everything a run needs; `config_to_yaml` / `load_config` round-trip it."""

    model: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=_run_engine)
    rollout: RolloutConfig = field(default_factory=_run_rollout)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sft: SftConfig = field(default_factory=SftConfig)

    @property
    def rollout_mode(self) -> str:
        """'tree' or 'trajectory', resolving rollout.mode=auto from algo.name."""
        if self.rollout.mode != "auto":
            return self.rollout.mode
        return "trajectory" if self.algo.name == "grpo" else "tree"

    @property
    def embedded_task(self) -> bool:
        return not self.data.train_files


SECTIONS: dict[str, type] = {f.name: type(f.default_factory()) for f in fields(Config)}  # type: ignore[misc]
BUILTIN_TOOLS = tuple(TOOL_REGISTRY)
BUILTIN_REWARDS = tuple(REWARD_REGISTRY)


def _settable(obj: Any) -> list[str]:
    """The fields of a section that a config may set (not the ones the run derives)."""
    return [f.name for f in fields(obj) if "derived" not in f.metadata]


# ---------------------------------------------------------------------------------------------------- building
def _set_field(section_obj: Any, section: str, key: str, value: Any, text: str | None = None) -> None:
    f = next((f for f in fields(section_obj) if f.name == key), None)
    if f is not None and "derived" in f.metadata:
        raise ConfigError(f"{section}.{key} is set by the run ({f.metadata['derived']}), not by the config")
    if f is None:
        raise unknown(f"key in section '{section}':", key, _settable(section_obj))
    set_field(section_obj, section, key, value, text)


def _apply_section(cfg: Config, section: str, body: Any, text: str | None = None) -> None:
    if section not in SECTIONS:
        raise unknown("config section", section, list(SECTIONS))
    obj = getattr(cfg, section)
    if body is None:
        return
    if isinstance(body, dict):
        for key, value in body.items():
            _set_field(obj, section, str(key), value)
    elif "name" in {f.name for f in fields(obj)}:  # `algo: grpo` / `algo=grpo` -> algo.name
        _set_field(obj, section, "name", body, text)
    else:
        raise ConfigError(f"section '{section}' must be a mapping of keys ({', '.join(_settable(obj))}), "
                          f"got {body!r}")


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
    """Nested plain values of every settable field (what `config_from_dict` reads back)."""
    return {name: {k: v for k, v in asdict(getattr(cfg, name)).items() if k in _settable(getattr(cfg, name))}
            for name in SECTIONS}


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
                raise unknown("config section", section, list(SECTIONS))
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
def validate(cfg: Config) -> Config:
    """Each section's own checks (types, ranges, its cross-field rules), then the rules that span sections;
    raises ConfigError naming the field. Returns cfg."""
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        if not isinstance(obj, cls):
            raise ConfigError(f"section '{section}' must be a {cls.__name__}, got {type(obj).__name__}")
        obj.check(section)
    if cfg.rollout.temperature == 0:
        raise ConfigError("rollout.temperature=0: training samples need a temperature > 0 (greedy decoding is for "
                          "evaluation: train.eval_temperature)")
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
            if "derived" in f.metadata:
                continue
            if comments:
                out += textwrap.wrap(f.metadata["help"], 110, initial_indent="  # ", subsequent_indent="  # ")
            out.append(f"  {f.name}: {_yaml_value(getattr(obj, f.name))}")
        out.append("")
    return "\n".join(out)


__all__ = ["Config", "ConfigError", "SECTIONS", "EMBEDDED_CONFIG", "CONFIG_DIR", "BUILTIN_TOOLS", "BUILTIN_REWARDS",
           "DATA_EXTENSIONS", "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
           "config_to_yaml", "validate", "check_paths"] + [cls.__name__ for cls in SECTIONS.values()]
