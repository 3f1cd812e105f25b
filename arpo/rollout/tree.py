"""The rollout tree: what the rollout produces and what the trainer consumes.

ARPO samples trajectories that branch right after tool results, so one prompt's M leaves share prefixes. We keep
that sharing explicit instead of flattening it: a tree holds the prompt once and a list of *segments*, each a run
of generated (or tool-result) tokens with exactly one parent. A leaf is a finished trajectory; its tokens are the
prompt followed by the segments on its path from the root. The packing in `arpo.algo.packing` relies on this to
forward every shared token once.

Conventions
- Segment ids are their index in `tree.segments`, and a parent always comes before its children
  (`parent < id`); `parent == -1` means "child of the prompt". `add_segment` keeps both true.
- `loss_mask` is 1 for tokens the policy sampled and 0 for tool-result tokens (and anything else not trained on).
- `logprobs` are the behaviour policy's sampled log-probs, `entropies` the entropy of the distribution sampled
  from (after temperature); both have one value per token (0.0 where not applicable, e.g. tool results).
- JSON round trip: `RolloutTree.from_json(tree.to_json()) == tree`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

ROOT = -1  # parent id of a segment that hangs directly off the prompt


@dataclass
class Segment:
    """A run of tokens with one parent (a segment id, or ROOT for the prompt)."""

    id: int
    parent: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def append(self, token_id: int, logprob: float = 0.0, entropy: float = 0.0, mask: int = 1) -> None:
        self.token_ids.append(int(token_id))
        self.logprobs.append(float(logprob))
        self.entropies.append(float(entropy))
        self.loss_mask.append(int(mask))

    def extend(self, token_ids: Iterable[int], logprobs: Iterable[float] | None = None,
               entropies: Iterable[float] | None = None, mask: int | Iterable[int] = 1) -> None:
        """Append several tokens; missing log-probs/entropies are 0.0, `mask` may be one value for all."""
        ids = [int(t) for t in token_ids]
        n = len(ids)
        lps = [0.0] * n if logprobs is None else [float(x) for x in logprobs]
        ents = [0.0] * n if entropies is None else [float(x) for x in entropies]
        masks = [int(mask)] * n if isinstance(mask, int) else [int(m) for m in mask]
        if not (len(lps) == len(ents) == len(masks) == n):
            raise ValueError(f"segment {self.id}: extend got {n} tokens, {len(lps)} logprobs, "
                             f"{len(ents)} entropies, {len(masks)} mask values")
        self.token_ids += ids
        self.logprobs += lps
        self.entropies += ents
        self.loss_mask += masks


@dataclass
class Leaf:
    """A finished trajectory, identified by the last segment on its path."""

    segment: int
    reward: float = 0.0
    text: str = ""
    tool_calls: int = 0
    finish_reason: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass
class RolloutTree:
    """One prompt's rollouts: the prompt once, segments with parent links, and the leaves."""

    prompt_ids: list[int]
    prompt: str = ""
    answer: str = ""
    data_source: str = ""
    segments: list[Segment] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    # -- building -------------------------------------------------------------------------------------------
    def add_segment(self, parent: int = ROOT, token_ids: Iterable[int] = (), logprobs=None, entropies=None,
                    loss_mask: int | Iterable[int] = 1) -> Segment:
        """Create a segment under `parent` (a segment id or ROOT) and return it; its id is its index."""
        if not (parent == ROOT or 0 <= parent < len(self.segments)):
            raise ValueError(f"add_segment: parent {parent} is neither ROOT (-1) nor an existing segment id "
                             f"(0..{len(self.segments) - 1})")
        seg = Segment(id=len(self.segments), parent=parent)
        seg.extend(token_ids, logprobs, entropies, loss_mask)
        self.segments.append(seg)
        return seg

    def add_leaf(self, segment: int, **fields) -> Leaf:
        """Mark the trajectory ending at `segment` as finished; `fields` are Leaf fields (reward, text, ...)."""
        if not 0 <= segment < len(self.segments):
            raise ValueError(f"add_leaf: segment {segment} does not exist ({len(self.segments)} segments)")
        leaf = Leaf(segment=segment, **fields)
        self.leaves.append(leaf)
        return leaf

    # -- queries --------------------------------------------------------------------------------------------
    def _leaf(self, leaf: Leaf | int) -> Leaf:
        return self.leaves[leaf] if isinstance(leaf, int) else leaf

    def path(self, leaf: Leaf | int) -> list[int]:
        """Segment ids from the root down to the leaf (a Leaf or a leaf index)."""
        ids, s = [], self._leaf(leaf).segment
        while s != ROOT:
            ids.append(s)
            s = self.segments[s].parent
        return ids[::-1]

    def children(self, segment: int) -> list[int]:
        """Ids of the segments whose parent is `segment` (ROOT for the prompt's children)."""
        return [s.id for s in self.segments if s.parent == segment]

    def depth_offset(self, segment: int) -> int:
        """Position (0-based, prompt included) of the segment's first token along its path."""
        n, s = len(self.prompt_ids), self.segments[segment].parent
        while s != ROOT:
            n += len(self.segments[s])
            s = self.segments[s].parent
        return n

    def leaf_token_ids(self, leaf: Leaf | int, with_prompt: bool = False) -> list[int]:
        """The leaf's response tokens (all segments on its path, tool results included)."""
        out = list(self.prompt_ids) if with_prompt else []
        for s in self.path(leaf):
            out += self.segments[s].token_ids
        return out

    def leaf_values(self, leaf: Leaf | int, name: str) -> list:
        """Per-token `logprobs`, `entropies` or `loss_mask` along the leaf's response."""
        if name not in ("logprobs", "entropies", "loss_mask", "token_ids"):
            raise ValueError(f"leaf_values: unknown field {name!r}")
        out: list = []
        for s in self.path(leaf):
            out += getattr(self.segments[s], name)
        return out

    def num_unique_tokens(self, with_prompt: bool = True) -> int:
        """Tokens in the tree, each shared token counted once (what the tree-packed trainer forwards)."""
        return (len(self.prompt_ids) if with_prompt else 0) + sum(len(s) for s in self.segments)

    def num_leaf_tokens(self, with_prompt: bool = True) -> int:
        """Tokens over all leaves as separate rows (what a duplicated-row trainer forwards)."""
        return sum(len(self.leaf_token_ids(l, with_prompt)) for l in self.leaves)

    def rewards(self) -> list[float]:
        return [l.reward for l in self.leaves]

    def validate(self) -> None:
        """Raise ValueError if ids, parent order, per-token lists or leaf references are inconsistent."""
        if not self.prompt_ids:
            raise ValueError("tree has an empty prompt: the first response token would have no predecessor")
        for i, s in enumerate(self.segments):
            if s.id != i:
                raise ValueError(f"segment at index {i} has id {s.id}")
            if not (s.parent == ROOT or 0 <= s.parent < i):
                raise ValueError(f"segment {i} has parent {s.parent}: parents must come first (or be -1)")
            n = len(s.token_ids)
            if not (len(s.logprobs) == len(s.entropies) == len(s.loss_mask) == n):
                raise ValueError(f"segment {i}: {n} tokens but {len(s.logprobs)} logprobs, "
                                 f"{len(s.entropies)} entropies, {len(s.loss_mask)} mask values")
            if any(m not in (0, 1) for m in s.loss_mask):
                raise ValueError(f"segment {i}: loss_mask values must be 0 or 1")
        for j, l in enumerate(self.leaves):
            if not 0 <= l.segment < len(self.segments):
                raise ValueError(f"leaf {j} ends at segment {l.segment}, which does not exist")

    # -- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutTree":
        d = dict(d)
        segments = [Segment(**s) for s in d.pop("segments", [])]
        leaves = [Leaf(**l) for l in d.pop("leaves", [])]
        tree = cls(**d, segments=segments, leaves=leaves)
        tree.validate()
        return tree

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "RolloutTree":
        return cls.from_dict(json.loads(text))

    # -- display --------------------------------------------------------------------------------------------
    def render(self, decode: Callable[[list[int]], str] | None = None, max_chars: int = 200) -> str:
        """Readable text: the prompt, then each segment indented under its parent, then the leaves.

        `decode` turns token ids into text (e.g. `tokenizer.decode`); without it token ids are shown. Segment
        text is cut to `max_chars` characters (0 = no cut); tool-result runs (mask 0) are shown in [[...]].
        """
        def show(ids: list[int]) -> str:
            text = decode(ids) if decode else " ".join(map(str, ids))
            text = text.replace("\n", "\\n")
            return text if not max_chars or len(text) <= max_chars else text[: max_chars - 3] + "..."

        def seg_text(s: Segment) -> str:
            parts, start = [], 0
            for i in range(1, len(s) + 1):  # split into runs of equal mask
                if i == len(s) or s.loss_mask[i] != s.loss_mask[start]:
                    run = show(s.token_ids[start:i])
                    parts.append(run if s.loss_mask[start] else f"[[{run}]]")
                    start = i
            return "".join(parts)

        leaf_of = {}
        for j, l in enumerate(self.leaves):
            leaf_of.setdefault(l.segment, []).append(j)
        lines = [f"prompt ({len(self.prompt_ids)} tok): {show(self.prompt_ids)}"]

        def walk(parent: int, indent: int) -> None:
            for c in self.children(parent):
                s = self.segments[c]
                tags = "".join(f" -> leaf {j} r={self.leaves[j].reward:g}" for j in leaf_of.get(c, []))
                lines.append(f"{'  ' * indent}#{c} ({len(s)} tok){tags}: {seg_text(s)}")
                walk(c, indent + 1)

        walk(ROOT, 1)
        lines.append(f"{len(self.leaves)} leaves, {self.num_unique_tokens()} unique tokens, "
                     f"{self.num_leaf_tokens()} as separate rows")
        for j, l in enumerate(self.leaves):
            lines.append(f"  leaf {j}: segments {self.path(l)} reward={l.reward:g} tool_calls={l.tool_calls} "
                         f"finish={l.finish_reason or '-'}")
        return "\n".join(lines)
