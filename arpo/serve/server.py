"""Assembling and running a server: model, tokenizer, engine and tools from the run config, then uvicorn.

    server = build_server("runs/embedded/step_000040", cfg, ServeSettings(port=8000), tools=["python"])
    run_forever(server)                               # `arpo serve`
    with ServerThread(server) as st: ... st.url       # tests: a free port on 127.0.0.1

Model, tokenizer, engine and tools are built by the run's one builder (`arpo.build`: `load_policy`,
`build_engine`, `build_tools`), so a served checkpoint decodes exactly as it did in training and evaluation; the
engine and the tools are built in the engine process (`load_parts` runs there, see `engine_client.py`).
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import replace

from arpo.serve.settings import ServeSettings


def load_parts(checkpoint: str, cfg, max_seqs: int, tools: list[str] | None = None):
    """(engine, tool executor or None) on the checkpoint, built as a run builds them (`arpo chat` uses this
    too, without the HTTP stack); the executor speaks the run's `tools.protocol`."""
    from arpo.build import build_engine, build_tools, load_policy, set_threads
    from arpo.settings import ConfigError

    set_threads(cfg.train.threads)
    model, tok = load_policy(checkpoint, cfg.model)
    model.eval()
    executor = None
    if tools:
        cfg.tools = replace(cfg.tools, enabled=list(tools))
        executor = build_tools(cfg, tok)  # tools.protocol, rendered through this checkpoint's chat template
        if executor.protocol.needs_chat_template and not cfg.data.chat_template:
            executor.close()
            raise ConfigError(f"tools.protocol={executor.protocol.name} shows the tools through the chat template: "
                              "it needs data.chat_template=true")
    return build_engine(model, tok, cfg, max_seqs), executor


def build_server(checkpoint: str, cfg, settings: ServeSettings, tools: list[str] | None = None):
    """The server on the checkpoint, its engine process started and ready (start-up errors raise here: a bad
    checkpoint or tool name is refused before anything listens)."""
    from arpo.serve.app import Server
    from arpo.serve.engine_client import EngineClient

    engine = EngineClient(checkpoint, cfg, settings.max_seqs, tools)
    name = settings.model_name or os.path.basename(os.path.normpath(checkpoint))
    return Server(engine, cfg.data, settings, name)


def _socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _uvicorn(server):
    import uvicorn

    from arpo.serve.app import create_app

    # http/loop "auto": httptools and uvloop when installed (the serve extra), else h11 and asyncio. At 32 streams
    # on a 2-core CPU they took the p99/p50 inter-token latency from 2.35-2.47x to 1.88-2.02x
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def freeze_startup_objects() -> None:
    """Move everything alive now (torch, transformers, the tokenizer, the app: millions of objects) out of the
    garbage collector's reach, as vLLM does after start-up: a full collection otherwise walks them all while
    requests wait (it put 150-170 ms into the p99 time to first token at 32 streams on a 2-core CPU; 46 ms
    with this)."""
    import gc

    gc.collect()
    gc.freeze()


def run_forever(server) -> None:
    sock = _socket(server.settings.host, server.settings.port)
    host, port = sock.getsockname()[:2]
    print(f"arpo serve: {server.model_name} on http://{host}:{port}/v1  (max_model_len {server.max_model_len}, "
          f"tools: {', '.join(server.tools) if server.tools else 'none'}; engine process {server.engine.pid})",
          flush=True)
    freeze_startup_objects()
    try:
        _uvicorn(server).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal way to stop
        print("arpo serve: stopped", flush=True)
    finally:
        server.engine.close()


class ServerThread:
    """uvicorn on a background thread, listening on a socket bound before it starts (no free-port race)."""

    def __init__(self, server, host: str = "127.0.0.1"):
        self.server = server
        self._sock = _socket(host, 0)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._uv = _uvicorn(server)
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="arpo-serve-http")

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        import time

        deadline = time.monotonic() + 60
        while not self._uv.started:  # a bounded wait on the outcome: uvicorn says it is serving
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._uv.should_exit = True
        self._thread.join(30)
        self._sock.close()
        self.server.engine.close()  # done by the lifespan already, unless uvicorn never got that far
