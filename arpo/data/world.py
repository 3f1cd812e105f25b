"""A small invented world for the embedded search task and the search tests.

Facts about made-up towns and people (so no model can know them in advance), rendered into 50 short encyclopedic
passages: `arpo/data/embedded/corpus.jsonl`. Town i was founded by person i; person i was born in town
`BIRTHPLACE[i]`, so "where was the founder of X born?" needs two searches. The text uses only lower-case letters,
digits, spaces and full stops, all of which the embedded character tokenizer can spell.

The agent task (`arpo.data.agent`) searches a second corpus, `arpo/data/embedded/agent_corpus.jsonl` (80
passages): compact town passages that also give a population, person passages that say where and when someone
was born but not what they founded (so "where was the founder of X born?" still needs a second search), and
distractors a search for a town or a person also returns — a namesake per person (same first name, another
birth year and town) and a passage per river naming the towns on it.

`python -m arpo.data.world` rewrites both JSONL files from these facts; a test checks they agree.
"""
from __future__ import annotations

import json
import os

CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "corpus.jsonl")
AGENT_CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "agent_corpus.jsonl")

# (town, river, province, known for)
TOWNS = [
    ("bramwick", "sellow", "tessary", "blue glass"), ("ostrel", "varn", "quellmark", "salt cheese"),
    ("hadrun", "mire", "tessary", "bell casting"), ("pelloway", "auden", "corvane", "rope making"),
    ("lindmoor", "sellow", "quellmark", "wool dyeing"), ("carrowgate", "tamsin", "corvane", "river ferries"),
    ("fennick", "varn", "olbrecht", "honey mead"), ("skellam", "auden", "olbrecht", "slate roofs"),
    ("dunvar", "mire", "pashenko", "iron locks"), ("marrowby", "tamsin", "pashenko", "paper mills"),
    ("quinholt", "sellow", "ferrant", "clock towers"), ("vessary", "varn", "ferrant", "silk ribbons"),
    ("holloway", "auden", "tessary", "apple orchards"), ("grisholm", "mire", "quellmark", "stone bridges"),
    ("tallowmere", "tamsin", "corvane", "candle wax"), ("ebbington", "sellow", "olbrecht", "oyster beds"),
    ("corrith", "varn", "pashenko", "copper pans"), ("wendle", "auden", "ferrant", "barley beer"),
    ("astbury", "mire", "tessary", "glass lenses"), ("morwen", "tamsin", "quellmark", "boat building"),
    ("pellinor", "sellow", "corvane", "map printing"), ("rushden", "varn", "olbrecht", "reed baskets"),
    ("stavely", "auden", "pashenko", "horse fairs"), ("thornbeck", "mire", "ferrant", "herb gardens"),
    ("ulverholm", "tamsin", "tessary", "pipe organs"),
]

# (person, occupation, birth year); person i founded TOWNS[i]
PEOPLE = [
    ("ilse varga", "glassmaker", 1512), ("tomas reeve", "merchant", 1498), ("anka polder", "bell founder", 1530),
    ("corin dale", "rope maker", 1544), ("mira holt", "weaver", 1521), ("edwin scarle", "ferryman", 1507),
    ("bettany crole", "beekeeper", 1539), ("oskar fenn", "quarryman", 1550), ("lisbet ahrn", "locksmith", 1515),
    ("jory maddox", "papermaker", 1562), ("hester quaid", "clockmaker", 1528), ("pavel strand", "silk trader", 1533),
    ("nell orchard", "farmer", 1519), ("ruben gaskell", "mason", 1547), ("tilda wick", "chandler", 1503),
    ("amos brine", "fisherman", 1556), ("vera kettle", "coppersmith", 1524), ("hugo malt", "brewer", 1541),
    ("sanne loupe", "lens grinder", 1536), ("dag keelson", "shipwright", 1509), ("orla quill", "printer", 1558),
    ("fenna rush", "basket weaver", 1527), ("bram stallard", "horse dealer", 1513), ("wren sorrel", "herbalist", 1549),
    ("kasimir pfeil", "organ builder", 1535),
]

# person i was born in TOWNS[BIRTHPLACE[i]] (never the town they founded)
BIRTHPLACE = [(7 * i + 3 + (i == 12)) % len(TOWNS) for i in range(len(PEOPLE))]
FOUNDING_AGE = [31 + (5 * i) % 17 for i in range(len(PEOPLE))]


# a namesake of person i: same first name, another surname, job, birth year and birthplace
NAMESAKE_SURNAMES = ["brun", "tolle", "marsh", "weir", "pike", "sallow", "dunn", "frey", "hale", "cobb", "lark",
                     "mott", "reed", "vance", "holm", "tarr", "ness", "bligh", "cole", "drew", "finch", "gale", "hobb",
                     "kemp", "lowe"]
NAMESAKE_JOBS = ["potter", "carter", "tanner", "miller", "baker", "cooper", "smith", "thatcher", "weaver", "dyer"]


def founded_year(i: int) -> int:
    return PEOPLE[i][2] + FOUNDING_AGE[i]


def population(i: int) -> int:
    """Town i's population: a four-digit number, distinct per town."""
    return 1200 + (i * 2971 + 613) % 8500


def namesake(i: int) -> tuple[str, str, int, int]:
    """(name, job, birth year, birthplace index) of person i's namesake."""
    first = PEOPLE[i][0].split()[0]
    return (f"{first} {NAMESAKE_SURNAMES[i]}", NAMESAKE_JOBS[i % len(NAMESAKE_JOBS)], PEOPLE[i][2] + 40 + (3 * i) % 23,
            (BIRTHPLACE[i] + 5 + i % 7) % len(TOWNS))


def town_passage(i: int, agent: bool = False) -> dict:
    """Town i's passage; `agent`: the agent corpus's compact form, which also gives the population."""
    town, river, province, known = TOWNS[i]
    if agent:
        text = (f"{town} lies on the {river} river in {province}. founded in {founded_year(i)} by {PEOPLE[i][0]}. "
                f"population {population(i)}. known for {known}.")
    else:
        text = (f"{town} is a town on the {river} river in the province of {province}. it was founded in "
                f"{founded_year(i)} by {PEOPLE[i][0]}. {town} is known for its {known}.")
    return {"id": f"town-{i}", "title": town, "text": text}


def person_passage(i: int, agent: bool = False) -> dict:
    """Person i's passage; `agent`: without the town they founded (the agent task's two hops stay two)."""
    name, job, born = PEOPLE[i]
    text = f"{name} was a {job} born in {born} in {TOWNS[BIRTHPLACE[i]][0]}."
    if not agent:
        text = (f"{name} was a {job} born in {born} in the town of {TOWNS[BIRTHPLACE[i]][0]}. "
                f"{name.split()[0]} later founded the town of {TOWNS[i][0]}.")
    return {"id": f"person-{i}", "title": name, "text": text}


def corpus() -> list[dict]:
    return [town_passage(i) for i in range(len(TOWNS))] + [person_passage(i) for i in range(len(PEOPLE))]


def namesake_passage(i: int) -> dict:
    name, job, born, home = namesake(i)
    return {"id": f"namesake-{i}", "title": name, "text": f"{name} was a {job} born in {born} in {TOWNS[home][0]}."}


def river_passage(river: str) -> dict:
    towns = [t[0] for t in TOWNS if t[1] == river]
    return {"id": f"river-{river}", "title": f"{river} river",
            "text": f"the {river} river passes {', '.join(towns[:-1])} and {towns[-1]}."}


RIVERS = sorted({t[1] for t in TOWNS})


def agent_corpus() -> list[dict]:
    n = len(TOWNS)
    return ([town_passage(i, agent=True) for i in range(n)] + [person_passage(i, agent=True) for i in range(n)]
            + [namesake_passage(i) for i in range(n)] + [river_passage(r) for r in RIVERS])


def write_corpus(path: str = CORPUS_PATH, docs: list[dict] | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in corpus() if docs is None else docs:
            f.write(json.dumps(doc) + "\n")


assert len(TOWNS) == len(PEOPLE) and all(BIRTHPLACE[i] != i for i in range(len(PEOPLE)))
assert len({population(i) for i in range(len(TOWNS))}) == len(TOWNS)

if __name__ == "__main__":
    write_corpus()
    write_corpus(AGENT_CORPUS_PATH, agent_corpus())
    print(f"wrote {len(corpus())} passages to {CORPUS_PATH}, {len(agent_corpus())} to {AGENT_CORPUS_PATH}")
