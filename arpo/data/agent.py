"""The agent task (`data.embedded_task: agent`): questions that need 0, 1, 2 or 3 calls of python and search.

The embedded default needs exactly one python call per question, so nothing is decided after a tool result. Here
the number and kind of calls depend on the question, and a search result holds distractor passages (the agent
corpus of `arpo.data.world`, top 2), so what to do after a result — search again, compute, or answer, and with
which name or number from which page — is the decision ARPO branches on.

| data_source     | calls                  | example                                                     |
| --------------- | ---------------------- | ----------------------------------------------------------- |
| agent_direct    | none                   | `Q: what is 4817*1+0?` · `Q: which comes first: ostrel or hadrun?` |
| agent_arith     | python                 | `Q: what is 123*45+6?`                                      |
| agent_fact      | search                 | `Q: which river flows through bramwick?`                    |
| agent_twohop    | search, search         | `Q: where was the founder of bramwick born?`                |
| agent_fact_calc | search, python         | `Q: how many years before 2000 was bramwick founded?`       |
| agent_age       | search, search, python | `Q: how old was the founder of bramwick at its founding?`   |
| agent_sum       | search, search, python | `Q: how many people live in bramwick and ostrel together?`  |

The direct questions look like the others on purpose (`*1+0` reads like arithmetic) and are answerable from the
prompt alone: a policy that calls a tool for them shows up as tool calls per leaf above the gold traces'.

Splits are fixed by a hash of the question (`question_split`), so train and held-out never overlap, whatever the
seed. `agent_examples(n, split, seed)` draws the mix of `MIX`. Demonstrations (`agent_demo_segments`)
run the real search tool (`agent_search_tool()`, the one rollouts use) and spell the python result the sandbox
prints; answers are plain (`<answer>1813</answer>`), scored by the `embedded` reward.
"""
from __future__ import annotations

import hashlib
import random
from functools import lru_cache

from arpo.data import world
from arpo.data.embedded import Example, _check_split, split_of
from arpo.tools.base import format_result

DIRECT, ARITH, FACT, TWOHOP = "agent_direct", "agent_arith", "agent_fact", "agent_twohop"
FACT_CALC, AGE, SUM = "agent_fact_calc", "agent_age", "agent_sum"
SOURCES = (DIRECT, ARITH, FACT, TWOHOP, FACT_CALC, AGE, SUM)
# share of each kind in a drawn mix (the rest of a rounding goes to the first kinds)
MIX = {DIRECT: 0.15, ARITH: 0.15, FACT: 0.15, TWOHOP: 0.2, FACT_CALC: 0.1, AGE: 0.1, SUM: 0.15}
AGENT_SEARCH_TOP_K = 2
REFERENCE_YEAR = 2000
SEARCH_HELDOUT_EVERY = 5  # the world is small: one search question in five is held out
N = len(world.TOWNS)


def _founder(i: int) -> str:
    return world.PEOPLE[i][0]


def _birthplace(i: int) -> str:
    return world.TOWNS[world.BIRTHPLACE[i]][0]


def _ex(prompt: str, answer, source: str, calls: list[tuple[str, str]]) -> Example:
    """An example whose gold trace makes `calls` ((tool, content) in order) before answering."""
    return Example(f"Q: {prompt}", str(answer), source, {"calls": calls})


def _search_questions() -> list[Example]:
    """Every question about the world (fact, two-hop, fact+python, age, and the 600 ordered population sums)."""
    out = []
    for i, (town, river, province, known) in enumerate(world.TOWNS):
        name, job, born = world.PEOPLE[i]
        founded = world.founded_year(i)
        s_town, s_name = ("search", town), ("search", name)
        out += [
            _ex(f"which river flows through {town}?", river, FACT, [s_town]),
            _ex(f"in which province is {town}?", province, FACT, [s_town]),
            _ex(f"what is {town} known for?", known, FACT, [s_town]),
            _ex(f"in what year was {name} born?", born, FACT, [s_name]),
            _ex(f"where was {name} born?", _birthplace(i), FACT, [s_name]),
            _ex(f"where was the founder of {town} born?", _birthplace(i), TWOHOP, [s_town, s_name]),
            _ex(f"in what year was the founder of {town} born?", born, TWOHOP, [s_town, s_name]),
            _ex(f"what was the job of the founder of {town}?", job, TWOHOP, [s_town, s_name]),
            _ex(f"how many years before {REFERENCE_YEAR} was {town} founded?", REFERENCE_YEAR - founded, FACT_CALC,
                [s_town, ("python", f"print({REFERENCE_YEAR}-{founded})")]),
            _ex(f"what is the population of {town} times 3?", 3 * world.population(i), FACT_CALC,
                [s_town, ("python", f"print({world.population(i)}*3)")]),
            _ex(f"how old was the founder of {town} at its founding?", founded - born, AGE,
                [s_town, s_name, ("python", f"print({founded}-{born})")]),
        ]
        for j, other in enumerate(world.TOWNS):
            if j != i:
                pi, pj = world.population(i), world.population(j)
                out.append(_ex(f"how many people live in {town} and {other[0]} together?", pi + pj, SUM,
                               [s_town, ("search", other[0]), ("python", f"print({pi}+{pj})")]))
    return out


def _hash(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")


@lru_cache(maxsize=1)
def _search_pool() -> dict[str, dict[str, list[Example]]]:
    """{split: {source: examples}} of the search questions, fixed: of each kind, the fifth (at least 5) with the
    smallest question hash is held out — a plain 1-in-10 hash would leave the 25 age questions none."""
    pool: dict[str, dict[str, list[Example]]] = {"train": {}, "heldout": {}}
    by_kind: dict[str, list[Example]] = {}
    for ex in _search_questions():
        by_kind.setdefault(ex.data_source, []).append(ex)
    for source, exs in by_kind.items():
        exs = sorted(exs, key=lambda e: _hash(e.prompt))
        k = max(5, len(exs) // SEARCH_HELDOUT_EVERY)
        pool["heldout"][source], pool["train"][source] = exs[:k], exs[k:]
    return pool


def question_split(example: Example) -> str:
    """The split `example` belongs to ('train' or 'heldout')."""
    if example.data_source in (ARITH, DIRECT):
        return split_of(example.prompt)
    held = _search_pool()["heldout"].get(example.data_source, [])
    return "heldout" if example.prompt in {e.prompt for e in held} else "train"


def _arith(rng: random.Random) -> Example:
    a, b, c = rng.randint(100, 999), rng.randint(10, 99), rng.randint(1, 99)
    return _ex(f"what is {a}*{b}+{c}?", a * b + c, ARITH, [("python", f"print({a}*{b}+{c})")])


def _direct(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        a = rng.randint(100, 9999)
        return _ex(f"what is {a}*1+0?", a, DIRECT, [])
    first, second = rng.sample([t[0] for t in world.TOWNS], 2)
    return _ex(f"which comes first: {first} or {second}?", first, DIRECT, [])


def _draw(source: str, k: int, split: str, rng: random.Random) -> list[Example]:
    """`k` distinct questions of one kind and split (cycling through a kind that has fewer)."""
    if source in (ARITH, DIRECT):
        make, seen, out, misses = (_arith if source == ARITH else _direct), set(), [], 0
        while len(out) < k:
            ex = make(rng)
            if ex.prompt not in seen and split_of(ex.prompt) == split:
                seen.add(ex.prompt)
                out.append(ex)
                misses = 0
            else:
                misses += 1
                if misses > 10_000:  # the kind has (nearly) run out of distinct questions in this split
                    raise ValueError(f"cannot draw {k} distinct {source} questions of the {split} split "
                                     f"(found {len(out)}); ask for fewer")
        return out
    pool = list(_search_pool()[split][source])
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(k)]


def agent_examples(n: int, split: str = "train", seed: int = 0) -> list[Example]:
    """`n` questions of one split in the proportions of `MIX`, shuffled, reproducible from `seed`. Training
    questions of a kind repeat once its pool is used up; held-out ones never do (see below)."""
    _check_split(split)
    rng = random.Random(seed)
    counts = {s: int(n * share) for s, share in MIX.items()}
    for s in list(MIX)[: n - sum(counts.values())]:
        counts[s] += 1
    if split == "heldout":  # no question twice in an evaluation: a kind's shortfall goes to arithmetic and direct
        for s in (FACT, TWOHOP, FACT_CALC, AGE, SUM):
            short = max(counts[s] - len(_search_pool()["heldout"][s]), 0)
            counts[s] -= short
            counts[ARITH] += short - short // 2
            counts[DIRECT] += short // 2
    out = [ex for s in MIX for ex in _draw(s, counts[s], split, rng)]
    rng.shuffle(out)
    return out


@lru_cache(maxsize=1)
def agent_search_tool():
    """The search tool of the agent task's demonstrations and rollouts: the agent corpus, top 2."""
    from arpo.tools.search import LocalSearch

    return LocalSearch(world.AGENT_CORPUS_PATH, top_k=AGENT_SEARCH_TOP_K)


def python_output(code: str) -> str:
    """What the sandbox returns for a gold call `print(<integer expression>)`: the value (the trace is checked
    against the real sandbox in the tests)."""
    if not (code.startswith("print(") and code.endswith(")")):
        raise ValueError(f"not a gold python call: {code!r}")
    expr = code[len("print("):-1]
    if not set(expr) <= set("0123456789+-*"):
        raise ValueError(f"not a gold python call: {code!r}")
    return str(eval(expr, {"__builtins__": {}}))  # noqa: S307 - digits and + - * only, checked above


@lru_cache(maxsize=4096)
def _default_search_text(query: str) -> str:
    """The default tool's result for `query` (deterministic; SFT draws tens of thousands of traces over ~50
    distinct queries)."""
    return agent_search_tool().run(query).text


def agent_demo_segments(example: Example, search=None) -> list[tuple[str, bool]]:
    """The gold trace as `(text, trainable)` segments: each call, its real result (untrained), the answer."""
    run_search = (lambda q: search.run(q).text) if search is not None else _default_search_text
    segments: list[tuple[str, bool]] = []
    for tool, content in example.meta["calls"]:
        result = run_search(content) if tool == "search" else python_output(content)
        segments += [(f"<{tool}>{content}</{tool}>", True), (format_result(result), False)]
    return segments + [(f"<answer>{example.answer}</answer>", True)]


def all_agent_texts() -> list[str]:
    """Every prompt and gold trace text the task can produce (what the tokenizer's vocabulary must cover),
    besides the digits of drawn arithmetic."""
    texts = [d["text"] for d in world.agent_corpus()] + [d["title"] for d in world.agent_corpus()]
    exs = _search_questions() + [_arith(random.Random(0)), _direct(random.Random(0)), _direct(random.Random(1))]
    for ex in exs:
        texts.append(ex.prompt + "".join(t for t, _ in agent_demo_segments(ex)))
    towns = [t[0] for t in world.TOWNS]
    texts += [f"Q: which comes first: {a} or {b}?<answer>{a}</answer>" for a in towns for b in towns[:2]]
    return texts


__all__ = ["DIRECT", "ARITH", "FACT", "TWOHOP", "FACT_CALC", "AGE", "SUM", "SOURCES", "MIX", "AGENT_SEARCH_TOP_K",
           "agent_examples", "question_split", "agent_search_tool", "agent_demo_segments", "python_output",
           "all_agent_texts"]
