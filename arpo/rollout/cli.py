"""`arpo rollout`: run the tree rollout of a model on a dataset, save the trees as JSONL, print them as text.

    arpo rollout                                   # the scripted toy policy on 2 embedded questions, M=8 N=4
    arpo rollout --model ckpt/ --data data.jsonl --n 4 --leaves 16 --initial 8 --out trees.jsonl
    arpo rollout --mode trajectory --rule bernoulli --set probe_tokens=10 --set max_tool_calls=5

`--model toy` (the default) is `arpo.rollout.toy_policy.tool_chain_policy("python")`: a Qwen2 of the embedded
model's shape whose weights keep writing python calls — useful to watch the rollout mechanics without a trained
checkpoint. A checkpoint directory needs its tokenizer next to it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


def add_rollout_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rollout", help="run the entropy-adaptive tree rollout and print/save the trees")
    p.add_argument("--model", default="toy", help="Qwen2 checkpoint directory, or 'toy' (scripted policy)")
    p.add_argument("--data", default="embedded", help="JSONL of {prompt, answer, data_source}, or 'embedded'")
    p.add_argument("--n", type=int, default=2, help="number of prompts")
    p.add_argument("--mode", choices=("tree", "trajectory"), default="tree")
    p.add_argument("--leaves", type=int, default=8, help="M: leaves per prompt")
    p.add_argument("--initial", type=int, default=4, help="N: global samples per prompt")
    p.add_argument("--rule", choices=("threshold", "bernoulli"), default="threshold")
    p.add_argument("--max-response-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--tools", default="python,search", help="comma-separated tool names")
    p.add_argument("--reward", default="embedded", help="reward name or pkg.module:function")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other RolloutConfig field, e.g. probe_tokens=10 (repeatable)")
    p.add_argument("--out", default=None, help="write the trees as JSONL here")
    p.add_argument("--show", type=int, default=1, help="print this many trees as text (0 = none)")
    p.add_argument("--max-chars", type=int, default=160, help="cut each printed segment to this many characters")
    p.set_defaults(func=run_rollout_cli)
    return p


def _overrides(items: list[str]) -> dict:
    from arpo.rollout.config import RolloutConfig

    types = {f.name: f.type for f in fields(RolloutConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(types))}")
        t = str(types[key])
        if "bool" in t:
            out[key] = value.lower() in ("1", "true", "yes")
        elif value.lower() in ("none", "null"):
            out[key] = None
        elif "int" in t:
            out[key] = int(value)
        elif "float" in t:
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _prompts(args) -> list:
    """Examples or JSONL rows; the rollout encodes their `prompt` text with the engine's tokenizer."""
    if args.data == "embedded":
        from arpo.data import embedded_examples

        return embedded_examples(args.n, split="heldout", seed=args.seed)
    from arpo.data import read_jsonl_rows

    return read_jsonl_rows(args.data)[: args.n]


def _tools(names: str):
    from arpo.tools import ToolExecutor, load_tool

    tools = {}
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name == "search":
            from arpo.data import embedded_search_tool

            tool = embedded_search_tool()
        else:
            tool = load_tool(name)
        tools[tool.tag] = tool
    return ToolExecutor(tools, max_workers=8, timeout_s=30) if tools else None


def run_rollout_cli(args) -> int:
    import torch

    from arpo.engine import LLMEngine
    from arpo.rewards import load_reward
    from arpo.rollout import RolloutConfig, TreeRollout

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "toy":
        from arpo.rollout.toy_policy import tool_chain_policy

        model, tok = tool_chain_policy("python", device=device, chain_kw={"eps": 1e-4, "p_eos": 0.05}, noise=5e-4)
        engine = LLMEngine(model, tokenizer=tok, max_model_len=4096)
    else:
        engine = LLMEngine.from_pretrained(args.model, device=device)
        if engine.tokenizer is None:
            raise SystemExit(f"no tokenizer found in {args.model}")
    try:
        cfg = RolloutConfig(mode=args.mode, leaves=args.leaves, initial=min(args.initial, args.leaves),
                            branch_rule=args.rule, max_response_tokens=args.max_response_tokens,
                            temperature=args.temperature, seed=args.seed, **_overrides(args.set))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    tools = _tools(args.tools)
    rollout = TreeRollout(engine, tools, cfg, load_reward(args.reward))
    try:
        trees = rollout.run(_prompts(args))
    finally:
        if tools is not None:
            tools.close()
    decode = engine.tokenizer.decode
    for tree in trees[: args.show]:
        print(tree.render(decode=decode, max_chars=args.max_chars))
        print()
    s = rollout.stats
    leaves = sum(len(t.leaves) for t in trees)
    print(f"{len(trees)} trees, {leaves} leaves, {sum(t.metadata['branches'] for t in trees)} branches, "
          f"{s['tool_calls']} tool calls, prefill {s['prefill_tokens']} / decode {s['decode_tokens']} tokens, "
          f"peak {s['peak_blocks']} KV blocks, {s['wall_s']:.2f} s; mean reward "
          f"{sum(r for t in trees for r in t.rewards()) / max(leaves, 1):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            for tree in trees:
                f.write(json.dumps(tree.to_dict()) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # python -m arpo.rollout.cli ...
    parser = argparse.ArgumentParser(prog="arpo")
    add_rollout_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["rollout", *sys.argv[1:]])
    sys.exit(a.func(a))
