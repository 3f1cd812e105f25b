"""The embedded tasks by name (`data.embedded_task`): their questions, demonstrations, tokenizer and corpus.

`arith` is the default of `arpo train` (`arpo.data.embedded`); `agent` needs 0-3 calls of both tools
(`arpo.data.agent`). The trainer, SFT and the run builder reach a task only through these four functions.
"""
from __future__ import annotations

from arpo.data.embedded import Example

TASKS = ("arith", "agent")


def _check(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown embedded task {task!r}: use one of {', '.join(TASKS)}")


def task_examples(section, n: int, split: str, seed: int) -> list[Example]:
    """`n` questions of `split` of the task `section.embedded_task` (a DataConfig)."""
    _check(section.embedded_task)
    if section.embedded_task == "agent":
        from arpo.data.agent import agent_examples

        return agent_examples(n, split, seed)
    from arpo.data.embedded import embedded_examples

    return embedded_examples(n, split, seed, section.embedded_lookup_fraction)


def task_demo_segments(example: Example) -> list[tuple[str, bool]]:
    """The demonstration of `example` as `(text, trainable)` segments, with its task's real tool results."""
    if example.data_source.startswith("agent_"):
        from arpo.data.agent import agent_demo_segments

        return agent_demo_segments(example)
    from arpo.data.embedded import demo_segments

    return demo_segments(example)


def task_tokenizer(task: str):
    """The bundled tokenizer of `task` (characters for arith, words for agent)."""
    _check(task)
    if task == "agent":
        from arpo.data.agent_tokenizer import load_agent_tokenizer

        return load_agent_tokenizer()
    from arpo.data.char_tokenizer import load_embedded_tokenizer

    return load_embedded_tokenizer()


def task_corpus(task: str) -> str:
    """The bundled search corpus of `task`."""
    _check(task)
    from arpo.data import world

    return world.AGENT_CORPUS_PATH if task == "agent" else world.CORPUS_PATH
