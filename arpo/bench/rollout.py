"""Tree rollout vs trajectory rollout vs the reference's re-prefill tree, on the embedded task's tokenizer and tools.

Policy: `arpo.rollout.toy_policy.tool_chain_policy("python")`, a Qwen2 of the embedded model's shape (hidden 128,
4 layers; hidden 512, 8 layers on CUDA) whose weights encode a character chain that keeps writing
`<python>12*3+4</python>` calls — an untrained model never closes a tag, so this scripted-but-real model is what
makes tool calls, pauses, probes and branching happen. Tools: the real Python sandbox (result cache off, output cut to
400 characters). Prompts: embedded arithmetic questions, bare (~16 tokens) or behind an instruction preamble of
`instructions` tokens — agent prompts carry their tool instructions (the reference's template is several hundred
tokens), and that shared prefix is what the re-prefill way computes again for every global sample and branch. What is
measured, per rollout of all prompts (M leaves each):

- `tree-fork`: ARPO on our engine — prompt prefilled once, branches forked (shared blocks, zero re-prefill).
- `tree-reprefill` (baseline): the same trees produced the reference's way — every global sample and every
  branch is a new request carrying its full prefix, prefix caching off. Same seeds, so same tokens.
  Both use `sync_tools=True`, which makes the budget race timing-free: the trees are identical (checked).
- `tree-fork-async`: tree-fork with tool calls overlapping decoding (the default).
- `trajectory-async`: M independent samples per prompt (GRPO's rollout), same tools and caps.
Extra columns: sampled tokens/s, tool calls per leaf, peak KV blocks, prefill tokens, unique tree tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DOC = "ARPO tree rollout (fork) vs re-prefill tree vs trajectory rollout: tokens/s, prefill, KV blocks, tools"
BASELINE = "tree-reprefill"
REPS = (1, 3)


@dataclass
class Case:
    prompts: int
    leaves: int
    initial: int
    max_response_tokens: int
    device: str
    instructions: int = 0  # tokens of tool instructions before each question

    @property
    def label(self) -> str:
        more = f" instructions={self.instructions}" if self.instructions else ""
        return f"rollout {self.prompts}p M={self.leaves} N={self.initial} cap={self.max_response_tokens}{more}"

    def extra(self) -> dict:
        return {"prompts": self.prompts, "leaves": self.leaves, "initial": self.initial,
                "instructions": self.instructions}


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case(2, 8, 4, 384, device)]
    return [Case(4, 16, 8, 512, device), Case(4, 16, 8, 512, device, instructions=512),
            Case(8, 16, 8, 512, device)]


INSTRUCTIONS = ("you are a careful assistant. to compute something, write python code inside the python tag and "
                "print the value; the output comes back inside the result tag. then give the final answer inside "
                "the answer tag, with nothing else. ")


def instruction_prompts(examples: list, tokens: int) -> list:
    """`examples` behind a preamble of exactly `tokens` characters (= tokens of the character tokenizer)."""
    from dataclasses import replace

    if not tokens:
        return examples
    text = (INSTRUCTIONS * (tokens // len(INSTRUCTIONS) + 1))[:tokens - 1] + "\n"
    return [replace(ex, prompt=text + ex.prompt) for ex in examples]


_POLICY: dict = {}


def _policy(device: str):
    if device not in _POLICY:
        from arpo.rollout.toy_policy import tool_chain_policy

        kw = dict(hidden_size=512, layers=8, heads=8, kv_heads=2, intermediate_size=1536) if device.startswith(
            "cuda") else {}
        _POLICY[device] = tool_chain_policy("python", seed=0, device=device, chain_kw={"eps": 1e-4, "p_eos": 0.05},
                                            noise=5e-4, **kw)
    return _POLICY[device]


def make_rollout(case: Case, mode: str, prefix_mode: str, sync_tools: bool):
    """A zero-argument callable running one rollout of the case's prompts; `.last` holds its trees and stats."""
    from arpo.data import embedded_examples
    from arpo.engine import LLMEngine
    from arpo.rewards import embedded_reward
    from arpo.rollout import RolloutConfig, TreeRollout
    from arpo.tools import PythonSandbox, ToolExecutor

    model, tok = _policy(case.device)
    engine = LLMEngine(model, tokenizer=tok, block_size=16, num_blocks=8192, max_model_len=2048,
                       max_num_batched_tokens=8192, enable_prefix_caching=prefix_mode == "fork")
    tools = ToolExecutor({"python": PythonSandbox()}, max_workers=8, timeout_s=10, cache_size=0,
                         max_result_chars=400)
    cfg = RolloutConfig(mode=mode, leaves=case.leaves, initial=case.initial, prefix_mode=prefix_mode,
                        sync_tools=sync_tools, max_response_tokens=case.max_response_tokens)
    rollout = TreeRollout(engine, tools, cfg, embedded_reward)
    prompts = instruction_prompts(embedded_examples(case.prompts, seed=3), case.instructions)

    def run():
        result = rollout.run(prompts, seed=0)
        run.last = (result.trees, result.stats)
        return result.trees
    run()
    trees, stats = run.last
    leaves = sum(len(t.leaves) for t in trees)
    sampled = sum(sum(s.loss_mask) for t in trees for s in t.segments)
    run.extra = {"sampled_tokens": sampled, "tokens_per_s": sampled / stats["wall_s"],
                 "tool_calls_per_leaf": stats["tool_calls"] / leaves, "peak_kv_blocks": stats["peak_blocks"],
                 "prefill_tokens": stats["prefill_tokens"], "decode_tokens": stats["decode_tokens"],
                 "unique_tree_tokens": sum(t.num_unique_tokens() for t in trees),
                 "branches": sum(t.metadata["branches"] for t in trees)}
    run.trees = [t.to_json() for t in trees]
    return run


def providers(device: str) -> dict:
    return {
        "tree-reprefill": lambda case: make_rollout(case, "tree", "resubmit", True),
        "tree-fork": lambda case: make_rollout(case, "tree", "fork", True),
        "tree-fork-async": lambda case: make_rollout(case, "tree", "fork", False),
        "trajectory-async": lambda case: make_rollout(case, "trajectory", "fork", False),
    }


def same_trees(case: Case) -> bool:
    """Do the fork and re-prefill providers build identical trees (token ids and parent links)?"""
    import json

    def shape(run):
        return [[(s["parent"], s["token_ids"]) for s in json.loads(t)["segments"]] for t in run.trees]
    return shape(make_rollout(case, "tree", "fork", True)) == shape(make_rollout(case, "tree", "resubmit", True))


def threads_note() -> str:
    return f"torch threads {torch.get_num_threads()}"
