"""The embedded task behind `arpo train` with no dataset: questions a tiny model can only answer with its tools.

* arithmetic (`embedded_arith`): `Q: a*b+c=?` with a in [100, 999], b in [10, 99], c in [1, 99]. A 0.8M-parameter
  character model cannot multiply, but it can learn to write `<python>print(a*b+c)</python>` and copy the result.
* lookup (`embedded_lookup`): two-hop questions about the invented world of `arpo.data.world` ("where was the
  founder of bramwick born?"), answerable only by searching the bundled corpus twice.

Splits are fixed by a hash of the question, so train and held-out never overlap whatever the seed. Demonstration
traces for cold-start SFT come as segments `(text, trainable)`: the tool-result segments are exactly what the
tools append at rollout time (` <result>\\n...\\n</result>`) and are not trained on. The answer is plain, without
`\\boxed{}` (the embedded reward, `arpo.rewards.embedded_reward`, scores it). Rollouts should use
`embedded_search_tool()` so that search results match the demonstrations.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import lru_cache

from arpo.data import world
from arpo.tools.base import format_result

ARITH, LOOKUP = "embedded_arith", "embedded_lookup"
HELDOUT_EVERY = 10  # one question in ten (by hash) is held out
EMBEDDED_SEARCH_TOP_K = 1


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    data_source: str
    meta: dict = field(default_factory=dict, compare=False)

    def row(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "data_source": self.data_source}


def split_of(prompt: str) -> str:
    """'heldout' for one prompt in HELDOUT_EVERY (by a stable hash), else 'train'."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def arith_example(a: int, b: int, c: int) -> Example:
    return Example(f"Q: {a}*{b}+{c}=?", str(a * b + c), ARITH, {"a": a, "b": b, "c": c})


def arith_examples(n: int, split: str = "train", seed: int = 0) -> list[Example]:
    """`n` distinct arithmetic questions of one split, drawn reproducibly from `seed`."""
    _check_split(split)
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        ex = arith_example(rng.randint(100, 999), rng.randint(10, 99), rng.randint(1, 99))
        if ex.prompt not in seen and split_of(ex.prompt) == split:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def _lookup_all() -> list[Example]:
    """Every two-hop question of the invented world (4 templates x 25)."""
    out = []
    for i, (name, _job, born) in enumerate(world.PEOPLE):
        town = world.TOWNS[i][0]
        home = world.TOWNS[world.BIRTHPLACE[i]]
        hops_town = {"queries": [town, name]}
        hops_person = {"queries": [name, home[0]]}
        out += [
            Example(f"Q: where was the founder of {town} born?", home[0], LOOKUP, hops_town),
            Example(f"Q: in what year was the founder of {town} born?", str(born), LOOKUP, hops_town),
            Example(f"Q: which river flows through the birthplace of {name}?", home[1], LOOKUP, hops_person),
            Example(f"Q: what is the birthplace of {name} known for?", home[3], LOOKUP, hops_person),
        ]
    return out


def lookup_examples(split: str = "train", seed: int | None = None) -> list[Example]:
    """The lookup questions of one split (all of them; shuffled when `seed` is given)."""
    _check_split(split)
    out = [ex for ex in _lookup_all() if split_of(ex.prompt) == split]
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


def embedded_examples(n: int, split: str = "train", seed: int = 0, lookup_fraction: float = 0.0) -> list[Example]:
    """A mix for the CLI's default run: `lookup_fraction` of lookup questions (cycled), the rest arithmetic."""
    if not 0.0 <= lookup_fraction <= 1.0:
        raise ValueError(f"lookup_fraction must be in [0, 1], got {lookup_fraction}")
    n_lookup = round(n * lookup_fraction)
    lookups = lookup_examples(split, seed)
    mixed = arith_examples(n - n_lookup, split, seed) + [lookups[i % len(lookups)] for i in range(n_lookup)]
    random.Random(seed).shuffle(mixed)
    return mixed


@lru_cache(maxsize=1)
def embedded_search_tool():
    """The search tool the embedded task's demonstrations (and rollouts) use: bundled corpus, top-1."""
    from arpo.tools.search import LocalSearch

    return LocalSearch(world.CORPUS_PATH, top_k=EMBEDDED_SEARCH_TOP_K)


def demo_segments(example: Example, search=None) -> list[tuple[str, bool]]:
    """The demonstration response as `(text, trainable)` segments; concatenated it is the full response text.

    Arithmetic: `<python>print(a*b+c)</python>`, ` <result>\\nR\\n</result>`, `<answer>R</answer>`.
    Lookup: two `<search>` calls with their real results, then `<answer>X</answer>`. End-of-sequence is left to the
    tokenizing side (append `eos` after the last segment).
    """
    if example.data_source == ARITH:
        m = example.meta
        return [(f"<python>print({m['a']}*{m['b']}+{m['c']})</python>", True),
                (format_result(example.answer), False), (f"<answer>{example.answer}</answer>", True)]
    if example.data_source == LOOKUP:
        search = search or embedded_search_tool()
        segments = []
        for query in example.meta["queries"]:
            segments += [(f"<search>{query}</search>", True), (format_result(search.run(query).text), False)]
        return segments + [(f"<answer>{example.answer}</answer>", True)]
    raise ValueError(f"no demonstration for data_source {example.data_source!r}")


def demo_text(example: Example, search=None) -> str:
    return "".join(text for text, _ in demo_segments(example, search))
