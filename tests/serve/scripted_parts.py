"""The engine process's builder for the hermes serve tests (`EngineClient(..., parts="scripted_parts:
load_scripted")`): the scripted policy of `tests/tools/scripted_policy.py` on the checkpoint directory's tokenizer
and `script.json`, with the run's tools built as `arpo serve` builds them. Imported in the engine process, so the
test puts this folder and `tests/tools` on its PYTHONPATH."""
from __future__ import annotations

import json
import os
from dataclasses import replace

from scripted_policy import scripted_engine


def save_script(path: str, tokenizer, script: list[int]) -> str:
    """A "checkpoint" for `load_scripted`: the tokenizer (the front end loads it) and the script."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "script.json"), "w", encoding="utf-8") as f:
        json.dump(script, f)
    return path


def load_scripted(checkpoint: str, cfg, max_seqs: int, tools: list[str] | None = None):
    from arpo.build import build_tools, load_tokenizer

    tok = load_tokenizer(checkpoint)
    with open(os.path.join(checkpoint, "script.json"), encoding="utf-8") as f:
        script = json.load(f)
    executor = build_tools(replace(cfg, tools=replace(cfg.tools, enabled=list(tools))), tok) if tools else None
    return scripted_engine(tok, script), executor
