"""Settings of `arpo serve` / `arpo chat` that belong to the server alone (the model, engine and tools come from
the run config). One dataclass with help text, so `arpo serve --help` and the code agree."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class ServeSettings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 = any free port)"})
    model_name: str = field(default="", metadata={"help": "model id clients must send (default: the checkpoint "
                                                          "directory's name)"})
    max_requests: int = field(default=64, metadata={"help": "requests admitted at once (running or waiting); "
                                                            "more are refused with 503"})
    max_n: int = field(default=16, metadata={"help": "largest n (choices per request)"})
    max_tool_calls: int = field(default=3, metadata={"help": "agent mode: tool calls per choice; later tool tags "
                                                             "are plain text"})
    max_seqs: int = field(default=64, metadata={"help": "sequences the KV cache is sized for (CPU); more wait or "
                                                        "are preempted"})

    def __post_init__(self):
        for name in ("max_requests", "max_n", "max_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tool_calls < 0:
            raise ValueError(f"ServeSettings.max_tool_calls must be >= 0, got {self.max_tool_calls}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServeSettings.port must be in [0, 65535], got {self.port}")


def settings_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in fields(ServeSettings)}
