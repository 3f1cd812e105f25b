"""Book-keeping of one prompt's rollout while it runs, and its conversion into a `RolloutTree` at the end.

A trajectory is one engine sequence. Globals start at the prompt; a branch starts at the fork position of its
parent (right after a tool result) and owns only the tokens from there on. When the prompt is done, each
trajectory's tokens are cut at the positions where children forked off it, which gives the tree's segments:
every token stored once, parents before children, one leaf per trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from arpo.rollout.branching import Decision
from arpo.rollout.prompts import PromptInput
from arpo.rollout.tree import ROOT, RolloutTree


@dataclass
class Arrays:
    """Per response token (positions from the prompt's end): id, sampled log-prob, entropy, sampled or given."""
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)

    def __add__(self, other: "Arrays") -> "Arrays":
        return Arrays(self.ids + other.ids, self.logprobs + other.logprobs, self.entropies + other.entropies,
                      self.sampled + other.sampled)

    def head(self, n: int) -> "Arrays":
        return Arrays(self.ids[:n], self.logprobs[:n], self.entropies[:n], self.sampled[:n])

    @classmethod
    def of_sequence(cls, seq, start: int) -> "Arrays":
        """The engine sequence's tokens from absolute position `start` on."""
        off = start - seq.prompt_len
        return cls(list(seq.token_ids[start:]), list(seq.out_logprobs[off:]), list(seq.out_entropies[off:]),
                   list(seq.out_sampled[off:]))


@dataclass
class Trajectory:
    key: str                      # path: "g3" (global 3), "g3.1.0" (child 0 of g3's decision after call 1)
    prompt: int                   # index of its prompt in the batch
    seq_id: int
    start: int                    # absolute position of its first own token
    base: int                     # the engine sequence's prompt_len (start in resubmit mode, else the prompt's)
    prefix: Arrays                # response tokens before `base` (resubmit mode: inherited from the parent)
    parent: "Trajectory | None" = None
    calls: int = 0
    consecutive: int = 0          # branch decisions in a row on this lineage (AEPO penalty)
    fill: bool = False            # a fresh global that fills an unspent budget
    probe_from: int | None = None  # while probing: absolute position right after the latest result
    children: list = field(default_factory=list)     # (Trajectory, fork position)
    h_tool: list = field(default_factory=list)       # H_t of each decision (AEPO dynamic budget)
    tool_ok: list = field(default_factory=list)      # per call: did the tool succeed
    result_dropped: bool = False  # its last result did not fit under the length cap
    record: Arrays | None = None  # the full response, set when it finishes
    finish_reason: str = ""


@dataclass
class PromptState:
    index: int                    # position in this `run` call
    inp: PromptInput
    seed_index: int = -1          # what its random draws are keyed on (default: `index`)
    anchor: int | None = None     # fork mode: a stopped sequence holding just the prompt's cache
    anchor_ready: bool = False
    pending_globals: int = 0      # globals waiting for the anchor's prefill
    trajs: list = field(default_factory=list)
    count: int = 0                # trajectories in flight or done (= leaves promised)
    active: int = 0               # trajectories not finished yet
    presampling: bool = False     # AEPO dynamic budget: the first global runs alone
    decisions: list = field(default_factory=list)
    dynamic_m: int | None = None  # AEPO dynamic budget: the global sample count chosen
    done: bool = False

    def __post_init__(self):
        if self.seed_index < 0:
            self.seed_index = self.index

    @property
    def prompt_len(self) -> int:
        return len(self.inp.prompt_ids)

    @property
    def num_globals(self) -> int:
        return sum(1 for t in self.trajs if t.parent is None)


def build_tree(st: PromptState, decode, reward_fn, meta: dict) -> RolloutTree:
    """The finished prompt as a tree: segments cut at fork points, one leaf per trajectory (creation order)."""
    inp, P = st.inp, st.prompt_len
    tree = RolloutTree(prompt_ids=list(inp.prompt_ids), prompt=inp.prompt, answer=_jsonable(inp.answer),
                       data_source=inp.data_source)
    leaf_seg: dict[str, int] = {}

    def emit(traj: Trajectory, parent_seg: int) -> None:
        rec = traj.record
        end = P + len(rec.ids)
        seg_at, prev, pos = {}, parent_seg, traj.start
        for cut in sorted({at for _, at in traj.children} | {end}):
            if cut > pos:
                a, b = pos - P, cut - P
                prev = tree.add_segment(prev, rec.ids[a:b], rec.logprobs[a:b], rec.entropies[a:b],
                                        [1 if s else 0 for s in rec.sampled[a:b]]).id
            seg_at[cut], pos = prev, cut
        leaf_seg[traj.key] = prev
        for child, at in traj.children:
            emit(child, seg_at[at])

    for traj in st.trajs:
        if traj.parent is None:
            emit(traj, ROOT)
    row = {k: v for k, v in inp.row.items() if k not in ("completion", "ground_truth")}
    row.setdefault("data_source", inp.data_source)
    for traj in st.trajs:
        text = decode(traj.record.ids)
        reward = float(reward_fn(text, inp.answer, **row)) if reward_fn is not None else 0.0
        tree.add_leaf(leaf_seg[traj.key], reward=reward, text=text, tool_calls=traj.calls,
                      finish_reason=traj.finish_reason,
                      metadata={"key": traj.key, "global": traj.parent is None, "fill": traj.fill,
                                "tool_ok": list(traj.tool_ok), "result_dropped": traj.result_dropped})
    tree.metadata = dict(meta, decisions=[d.to_dict() for d in st.decisions],
                         branches=sum(d.children for d in st.decisions), globals=st.num_globals,
                         dynamic_globals=st.dynamic_m)
    return tree


def _jsonable(x):
    return x if isinstance(x, (str, int, float, list, dict)) or x is None else str(x)


__all__ = ["Arrays", "Decision", "PromptState", "Trajectory", "build_tree"]
