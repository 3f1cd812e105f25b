"""arpo.config: YAML ⇄ Config round trips, typed overrides, and errors that name the field and the choices."""
import dataclasses
import glob
import os
import typing

import pytest
import yaml

from arpo.config import (CONFIG_DIR, EMBEDDED_CONFIG, SECTIONS, Config, ConfigError, apply_overrides,
                         check_paths, config_from_dict, config_to_dict, config_to_yaml, load_config, validate)

EXAMPLES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def _load_text(tmp_path, text: str, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(str(path), overrides)


def test_every_field_has_help_and_default_config_is_valid():
    for name, cls in SECTIONS.items():
        assert cls.__doc__, name
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    validate(Config())


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_round_trip(path, tmp_path):
    cfg = load_config(path)
    text = config_to_yaml(cfg)
    again = _load_text(tmp_path, text)
    assert again == cfg
    assert config_to_yaml(again) == text
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg, comments=False))) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_examples_present_and_reference_values():
    assert {os.path.basename(p) for p in EXAMPLES} >= {"embedded.yaml", "qwen2.5-3b-h100.yaml"}
    ref = load_config(os.path.join(CONFIG_DIR, "qwen2.5-3b-h100.yaml"))
    assert (ref.rollout.leaves, ref.rollout.initial, ref.rollout.beam, ref.rollout.probe_tokens) == (16, 8, 1, 20)
    assert (ref.rollout.alpha, ref.rollout.beta, ref.rollout.tau) == (0.5, 0.2, 0.5)
    assert (ref.algo.clip_low, ref.algo.upper_clip(), ref.algo.dual_clip, ref.algo.kl_coef) == (0.2, 0.2, 3.0, 0.0)
    assert (ref.rollout.entropy_reduce, ref.rollout.branch_rule, ref.rollout.over_limit) == ("sum", "bernoulli", "end")
    assert (ref.optim.lr, ref.optim.weight_decay, ref.train.batch_prompts, ref.train.mini_batch_prompts) == \
        (1e-6, 0.01, 128, 16)
    emb = load_config(None)
    assert emb == load_config(EMBEDDED_CONFIG) and emb.embedded_task and emb.model.path == "embedded"
    assert emb.train.batch_prompts * emb.rollout.leaves < ref.train.batch_prompts * ref.rollout.leaves


def test_round_trip_of_awkward_values(tmp_path):
    cfg = Config()
    cfg.data.system_prompt = 'say "hi"\n# not a comment: {x} [y]\ttab é'
    cfg.tools.enabled = ["python", "my_pkg.tools:Calc"]
    cfg.algo.dual_clip = None
    cfg.optim.lr = 3.5e-7
    cfg.train.resume = "latest"
    assert _load_text(tmp_path, config_to_yaml(cfg)) == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "optim.lr=1e-5", "optim.betas=[0.8, 0.95]", "train.bf16=false",
                             "tools.enabled=python,search", "data.system_prompt=null", "model.path=123",
                             "algo.dual_clip=none", "rollout.temperature=2", "data.train_files=[a.jsonl]"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.train.bf16 is False
    assert cfg.tools.enabled == ["python", "search"]
    assert cfg.data.system_prompt is None and cfg.algo.dual_clip is None
    assert cfg.model.path == "123"
    assert cfg.rollout.temperature == 2.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.data.train_files == ["a.jsonl"] and not cfg.embedded_task


def test_types_follow_the_annotations():
    """Every field's value after a YAML round trip has the annotated type (catches a default of the wrong type)."""
    cfg = load_config(None)
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value, tp = getattr(getattr(cfg, name), f.name), hints[f.name]
            if typing.get_origin(tp) is typing.Literal:
                assert value in typing.get_args(tp)
            elif tp in (int, float, str, bool):
                assert type(value) is tp, f"{name}.{f.name}"


def test_algo_shortcut_and_rollout_mode():
    assert load_config(None).rollout_mode == "tree"
    grpo = load_config(None, ["algo=grpo"])
    assert grpo.algo.name == "grpo" and grpo.rollout_mode == "trajectory"
    assert load_config(None, ["reward=f1"]).reward.name == "f1"
    assert load_config(None, ["algo=grpo", "rollout.mode=tree"]).rollout_mode == "tree"


def test_yaml_section_shortcut(tmp_path):
    assert _load_text(tmp_path, "algo: grpo\n").algo.name == "grpo"


@pytest.mark.parametrize("override, needles", [
    (["train.stepz=3"], ["train", "stepz", "did you mean 'steps'", "batch_prompts"]),
    (["trian.steps=3"], ["trian", "did you mean 'train'", "rollout"]),
    (["algo=grpoo"], ["algo.name", "arpo, grpo", "did you mean 'grpo'"]),
    (["algo.aggregation=mean"], ["algo.aggregation", "token-mean, seq-mean-token-sum, seq-mean-token-mean"]),
    (["rollout.branch_rule=coin"], ["rollout.branch_rule", "threshold, bernoulli"]),
    (["train.steps=1.5"], ["train.steps", "integer"]),
    (["train.steps=0"], ["train.steps", "> 0"]),
    (["train.bf16=maybe"], ["train.bf16", "true or false"]),
    (["optim.lr=fast"], ["optim.lr", "number"]),
    (["rollout.top_p=1.5"], ["rollout.top_p", "<= 1"]),
    (["algo.dual_clip=0.9"], ["algo.dual_clip", "> 1"]),
    (["rollout.initial=32"], ["rollout.initial", "rollout.leaves"]),
    (["train.mini_batch_prompts=5"], ["train.mini_batch_prompts", "divide"]),
    (["model.device=gpu"], ["model.device", "cuda"]),
    (["tools.enabled=[pyhton]"], ["tools.enabled", "did you mean 'python'", "search"]),
    (["reward.name=embeded"], ["reward.name", "did you mean 'embedded'"]),
    (["data.train_files=[x.csv]"], ["data.train_files", ".parquet"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
    (["steps"], ["section.key=value"]),
    (["model=x"], ["section 'model'", "path"]),
])
def test_bad_overrides_name_the_field(override, needles):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_bad_file_names_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml.*rollout.*'leafs'.*did you mean 'leaves'"):
        _load_text(tmp_path, "rollout:\n  leafs: 4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        _load_text(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        _load_text(tmp_path, "- a\n- b\n")


def test_validate_catches_values_set_in_code():
    cfg = Config()
    cfg.train.keep_last = -1
    with pytest.raises(ConfigError, match="train.keep_last"):
        validate(cfg)
    cfg = Config()
    cfg.algo.attribution = "medium"
    with pytest.raises(ConfigError, match="soft, hard"):
        validate(cfg)


def test_apply_overrides_in_place_then_validate():
    cfg = apply_overrides(Config(), ["rollout.leaves=4"])  # initial=8 > leaves=4: only validate() complains
    with pytest.raises(ConfigError, match="rollout.initial"):
        validate(cfg)


def test_check_paths(tmp_path):
    check_paths(load_config(None))
    with pytest.raises(ConfigError, match="model.path"):
        check_paths(load_config(os.path.join(CONFIG_DIR, "qwen2.5-3b-h100.yaml")))
    with pytest.raises(ConfigError, match="data.train_files"):
        check_paths(load_config(None, [f"data.train_files=[{tmp_path / 'no.jsonl'}]"]))


def test_builtin_names_match_registries():
    from arpo.config import BUILTIN_REWARDS, BUILTIN_TOOLS
    from arpo.rewards.reward import BUILTIN_REWARDS as rewards
    from arpo.tools.registry import BUILTIN_TOOLS as tools

    assert set(BUILTIN_REWARDS) == set(rewards) and set(BUILTIN_TOOLS) == set(tools)
