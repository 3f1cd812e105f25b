"""Settings of `arpo serve` and `arpo chat` that belong to them alone (the model, engine and tools come from the
run config). Declared once, on the ground floor's `opt`, so `--help` (one `--flag` per field, see
`add_arguments`) and the code agree. Imports nothing heavy: the CLI's parser reads these."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from arpo.settings import check_fields, opt


@dataclass
class ServeSettings:
    """The HTTP server: where it listens, what it admits."""

    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "TCP port (0 = any free port)", ge=0, le=65535)
    model_name: str = opt("", "model id clients must send (default: the checkpoint directory's name)")
    max_requests: int = opt(64, "requests admitted at once (running or waiting); more are refused with 503", ge=1)
    max_n: int = opt(16, "largest n (choices per request)", ge=1)
    max_tool_calls: int = opt(3, "agent mode: tool calls per choice; later tool tags are plain text", ge=0)
    max_seqs: int = opt(64, "sequences the KV cache is sized for (CPU); more wait or are preempted", ge=1)

    def __post_init__(self):
        check_fields(self, "serve")


@dataclass
class ChatSettings:
    """Sampling of `arpo chat`'s replies."""

    temperature: float = opt(0.7, "sampling temperature (0 = greedy)", ge=0, le=2)
    top_p: float = opt(1.0, "nucleus sampling: smallest token set of this much probability", gt=0, le=1)
    top_k: int = opt(0, "sample among the k most likely tokens (0 = off)", ge=0)
    max_tokens: int = opt(256, "tokens sampled per reply at most (tool results do not count)", ge=1)
    seed: int = opt(-1, "seed of the first reply (later replies: seed + turn); -1 = the engine's seeds", ge=-1)
    max_tool_calls: int = opt(3, "with --tools: tool calls per reply; later tool tags are plain text", ge=0)

    def __post_init__(self):
        check_fields(self, "chat")


def add_arguments(parser: argparse.ArgumentParser, cls=ServeSettings) -> None:
    """One `--flag` per field of `cls` (`max_requests` → `--max-requests`), default and help from the field."""
    for f in fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default!r})")


def from_arguments(args: argparse.Namespace, cls=ServeSettings):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
