"""The one builder of a run's parts: policy model and tokenizer, engine, tools, reward, rollout.

`arpo train`, `sft`, `eval` and `rollout` (and the trainer and the tests) assemble their parts here, from the
composed config (`arpo.config.Config`), so that one setting reaches its layer by one path:

    cfg.rollout ─► build_rollout ─► TreeRollout(config=cfg.rollout) ─► SamplingParams ─► engine.add/fork/extend
    cfg.engine  ─► build_engine  ─► LLMEngine(model, EngineConfig)   (derived fields filled in here)

The engine wraps the *same* model object the optimiser updates (zero-copy): each rollout decodes with the weights
of the latest update. `model.path: embedded` means a 0.8M-parameter character-level Qwen2 (hidden 128, 4 layers,
4 heads / 2 KV heads, MLP 384, tied embeddings, the 54-symbol tokenizer of `arpo.data.char_tokenizer`, or with
`data.embedded_task: agent` the word-level one of `arpo.data.agent_tokenizer`), created
once with a seeded initialisation in `RUN_DIR/base_model/` in Hugging Face format and reused from there by every
later run in that directory — so a run directory is self-contained and its base model loads in transformers too.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

from arpo.model import CausalLM, ModelConfig
from arpo.settings import ConfigError

BASE_MODEL_DIR = "base_model"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- policy
def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={name!r} but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """`auto` → float32 on CPU, the checkpoint's dtype (bfloat16 if unset) on CUDA."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return checkpoint_dtype or torch.bfloat16


def embedded_model_config(section, vocab_size: int, max_positions: int = 2048) -> ModelConfig:
    s = section
    if s.embedded_hidden_size % s.embedded_heads:
        raise ValueError(f"model.embedded_hidden_size={s.embedded_hidden_size} is not divisible by "
                         f"model.embedded_heads={s.embedded_heads}")
    if s.embedded_heads % s.embedded_kv_heads:
        raise ValueError(f"model.embedded_kv_heads={s.embedded_kv_heads} must divide "
                         f"model.embedded_heads={s.embedded_heads}")
    raw = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return ModelConfig(vocab_size=vocab_size, hidden_size=s.embedded_hidden_size,
                       intermediate_size=s.embedded_intermediate_size, num_hidden_layers=s.embedded_layers,
                       num_attention_heads=s.embedded_heads, num_key_value_heads=s.embedded_kv_heads,
                       head_dim=s.embedded_hidden_size // s.embedded_heads, tie_word_embeddings=True,
                       max_position_embeddings=max_positions, raw=raw)


@torch.no_grad()
def init_weights(model: CausalLM, seed: int, std: float = 0.02) -> CausalLM:
    """Qwen2's initialisation (normal(0, 0.02) matrices, zero biases, unit norms), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def create_embedded_model(model_section, out_dir: str, seed: int = 0, task: str = "arith") -> str:
    """Write a freshly initialised embedded model + the tokenizer of embedded `task` to `out_dir` (atomically);
    returns `out_dir`."""
    from arpo.data import task_tokenizer

    tokenizer = task_tokenizer(task)
    model = init_weights(CausalLM(embedded_model_config(model_section, len(tokenizer))), seed)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def embedded_base_dir(run_dir: str, model_section, seed: int = 0, task: str = "arith") -> str:
    """`run_dir/base_model`, created on first use and reused afterwards."""
    path = os.path.join(run_dir, BASE_MODEL_DIR)
    if not os.path.isfile(os.path.join(path, "config.json")):
        os.makedirs(run_dir, exist_ok=True)
        create_embedded_model(model_section, path, seed, task)
    return path


def load_tokenizer(path: str):
    """The tokenizer saved next to a checkpoint; training needs one (prompts, tool calls, rewards are text)."""
    from arpo.engine.tokenizer_files import VOCAB_FILES, checkpoint_tokenizer

    tokenizer = checkpoint_tokenizer(path)
    if tokenizer is None:
        raise RuntimeError(f"{path}: no tokenizer files (none of {', '.join(VOCAB_FILES)}); save the model's "
                           "tokenizer next to the checkpoint (tokenizer.save_pretrained(path))")
    return tokenizer


def policy_dtype(path: str, model_section) -> torch.dtype:
    """The dtype the configured policy computes in (model.dtype resolved for its device and checkpoint)."""
    return resolve_dtype(model_section.dtype, resolve_device(model_section.device),
                         ModelConfig.from_file(path).torch_dtype)


def load_policy(path: str, model_section, dtype: torch.dtype | None = None) -> tuple[CausalLM, object]:
    """(model, tokenizer) from a checkpoint directory, on the configured device and dtype (or `dtype`)."""
    model, tokenizer = _checked_load(path, lambda: (
        CausalLM.from_pretrained(path, dtype=dtype or policy_dtype(path, model_section),
                                   device=resolve_device(model_section.device)), load_tokenizer(path)))
    model.gradient_checkpointing = bool(model_section.gradient_checkpointing)
    return model, tokenizer


def _checked_load(path: str, load):
    """`load()` of the model directory `path`, its failures (a truncated or missing file, a bad config) as one
    CheckpointError naming the directory and the file, rather than a library traceback. A checkpoint with a
    manifest is checked first (files present, sizes; the checksums are `--resume`'s, which verified them
    already), so the error names the bad file even when the library would not."""
    from safetensors import SafetensorError

    from arpo.trainer.checkpoint import CheckpointError, verify_checkpoint

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model directory")
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        problem = verify_checkpoint(path, checksums=False)
        if problem is not None:
            raise CheckpointError(f"{path}: bad checkpoint: {problem}")
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load the model: {type(exc).__name__}: {detail}") from exc


def base_model_path(cfg) -> str:
    """The directory the run starts from: model.path, or the embedded model in the run dir."""
    if cfg.model.path == "embedded":
        return embedded_base_dir(cfg.train.run_dir, cfg.model, cfg.train.seed, cfg.data.embedded_task)
    return cfg.model.path


# ---------------------------------------------------------------------------------------------------- parts
def build_tools(cfg, tokenizer=None):
    """The ToolExecutor of `cfg.tools` (the bundled embedded corpus for search unless one is configured), speaking
    `tools.protocol` (hermes renders through `tokenizer`'s chat template, so it needs the policy's tokenizer)."""
    from arpo.tools import ToolExecutor, load_tools
    from arpo.tools.protocol import make_protocol

    t = cfg.tools
    specs: dict[str, dict] = {}
    for name in t.enabled:
        if name == "python":
            specs[name] = {"timeout_s": t.python_timeout_s, "memory_mb": t.python_memory_mb}
        elif name == "search":
            kw: dict = {"top_k": t.search_top_k}
            if t.search_url:
                kw.update(url=t.search_url, protocol=t.search_protocol)
            else:
                from arpo.data.tasks import task_corpus

                kw["corpus_path"] = t.search_corpus or task_corpus(cfg.data.embedded_task)
            specs[name] = kw
        else:
            specs[name] = {}
    tools = load_tools(specs)
    try:
        if t.mcp_servers:
            tools.update(_mcp_tools(t, tools))
        protocol = make_protocol(t.protocol, tools, tokenizer, **cfg.data.template_kwargs())  # tool turns too
    except (ValueError, RuntimeError) as exc:
        _close_all(tools)
        raise ConfigError(str(exc)) from None
    return ToolExecutor(tools, max_workers=t.workers, timeout_s=t.call_timeout_s,
                        max_result_chars=t.max_result_chars, protocol=protocol)


def _mcp_tools(section, builtin: dict) -> dict:
    """The tools of `tools.mcp_servers` (their servers started), checked against the built-in tags."""
    from arpo.tools.mcp import load_mcp_tools

    mcp = load_mcp_tools(section.mcp_servers, call_timeout_s=section.mcp_timeout_s)
    clash = sorted(set(mcp) & set(builtin))
    if clash:
        _close_all(mcp)
        raise ValueError(f"tools.mcp_servers: tool name(s) {', '.join(clash)} already taken by tools.enabled")
    return mcp


def _close_all(tools: dict) -> None:
    for tool in tools.values():
        close = getattr(tool, "close", None)
        if callable(close):
            close()


def build_protocol(cfg, tokenizer):
    """`tools.protocol` without running tools (SFT renders prompts and masks results with it): tags needs no tool;
    hermes needs the tools' schemas, so their executor is built and closed again."""
    from arpo.tools.protocol import TagsProtocol

    if cfg.tools.protocol == "tags":
        return TagsProtocol({})
    tools = build_tools(cfg, tokenizer)
    tools.close()
    return tools.protocol


def build_reward(cfg):
    """`reward.name`'s function; a built-in one checks the format of `tools.protocol`."""
    import functools

    from arpo.rewards import BUILTIN_REWARDS, load_reward

    fn = load_reward(cfg.reward.name, strict_format=cfg.reward.strict_format,
                     math_equivalence=cfg.reward.math_equivalence)
    if cfg.reward.name in BUILTIN_REWARDS and cfg.tools.protocol != "tags":
        fn = functools.partial(fn, tool_protocol=cfg.tools.protocol)
    return fn


def max_model_len(cfg) -> int:
    """The engine's context: the configured one, else the prompt cap plus the response cap (and one token)."""
    return cfg.engine.max_model_len or cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens + 1


def engine_config(cfg, max_seqs: int, *, sharded: bool = False, device_type: str = "cpu"):
    """`cfg.engine` with what the run decides filled in: the context length, the seed (train.seed), room for
    `max_seqs` sequences, and on the CPU a cache sized for them. An FSDP2-`sharded` model decodes only inside
    `distributed.full_parameters`, whose gathered weights live at new addresses every rollout: no CUDA graphs
    then (they would replay stale weight pointers)."""
    e = cfg.engine
    if e.enable_prefix_caching:
        raise ConfigError("engine.enable_prefix_caching=true: a training run's cache would hold K/V computed with "
                          "an earlier step's weights")
    length = max_model_len(cfg)
    num_blocks = e.num_blocks
    if num_blocks is None and device_type != "cuda":
        num_blocks = max_seqs * math.ceil(length / e.block_size) + 8
    return replace(e, max_model_len=length, seed=cfg.train.seed, num_blocks=num_blocks,
                   max_num_seqs=max(e.max_num_seqs, max_seqs),
                   max_num_batched_tokens=max(e.max_num_batched_tokens, cfg.data.max_prompt_tokens * 4),
                   decode_graphs="off" if sharded else e.decode_graphs)


def build_engine(model, tokenizer, cfg, max_seqs: int, *, sharded: bool = False,
                 kv_dtype: torch.dtype | None = None):
    """An engine on `model` with room for `max_seqs` sequences of full length (on CUDA: a KV cache of
    engine.memory_fraction of the free memory — the optimiser's state is allocated after it, at the first
    update). It stops on every EOS id the checkpoint declares (generation_config.json, config.json, the
    tokenizer), in rollouts and eval alike."""
    from arpo.engine import LLMEngine

    ec = engine_config(cfg, max_seqs, sharded=sharded, device_type=model.device.type)
    return LLMEngine(model, ec, tokenizer=tokenizer, kv_dtype=kv_dtype)


def rollout_config(cfg, *, mode: str | None = None, leaves: int | None = None,
                   temperature: float | None = None):
    """`cfg.rollout` with its mode resolved from algo.name (and, for evaluation, its own leaves/temperature)."""
    over: dict = {"mode": mode or cfg.rollout_mode}
    if leaves is not None:
        over["leaves"] = leaves
        over["initial"] = min(cfg.rollout.initial, leaves)
    if temperature is not None:
        over["temperature"] = temperature
    return replace(cfg.rollout, **over)


def build_rollout(engine, tools, reward_fn, cfg, **kw):
    """The TreeRollout of `cfg.rollout` (see `rollout_config` for the keyword arguments)."""
    from arpo.rollout import TreeRollout

    return TreeRollout(engine, tools, rollout_config(cfg, **kw), reward_fn, tokenizer=engine.tokenizer)


def step_seed(base: int, step: int) -> int:
    """The rollout seed of 1-based training `step`: independent of how many steps ran in this process."""
    return (base * 1_000_003 + step * 7919) & ((1 << 62) - 1)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
