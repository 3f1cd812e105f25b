"""`arpo serve` vs the offline engine on the same requests: throughput, time to first token, inter-token latency.

Model: the embedded model (a Qwen2 of hidden 128, 4 layers, the character tokenizer; hidden 512, 8 layers on
CUDA), freshly initialised, saved as a checkpoint. Requests: `requests` embedded arithmetic questions as token-id
prompts, each `max_tokens` sampled tokens (temperature 1, a seed per request, EOS ignored, so every request does
the same work in both providers). Both providers build their engine from the checkpoint and the same run-config
overrides (`arpo.serve.server.load_parts`). What is measured, per case of `concurrency` c:

- `offline-generate` (baseline): `engine.generate` on the requests, c at a time (the batch width the server
  sees), in this process, no HTTP.
- `server`: `arpo serve` on the checkpoint in a child process on 127.0.0.1 (its engine in a process of its own);
  a client here (aiohttp, asyncio, as vLLM's serving benchmark) keeps c streamed `/v1/completions` requests in
  flight until all are answered. The client is load, not the server: it stamps each streamed line that carries a
  token (a substring test) and parses JSON only for an error, since on a machine with fewer free cores than the
  three busy processes (client, HTTP front end, engine) every CPU-second it spends is taken from the server
  (httpx with a JSON parse per chunk spent 0.23-0.39 CPU-s per c=32 pass, this client 0.11-0.20 s; 2-core EPYC).

`ms` is one pass over all requests (median of the timed passes), so "speed vs offline-generate" is the server's
throughput as a share of the offline engine's. Extra columns (printed under the table, saved with --out), over
every pass after the provider's own warm-up pass: requests/s and sampled tokens/s at the median pass's wall time;
time to first token (TTFT) and inter-token latency (ITL, the gaps between a request's streamed tokens) at p50 /
p99, pooled over the passes (a single pass's p99 on a shared 2-core machine swung 1.5-2.9x its p50).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import torch

DOC = "arpo serve vs offline generate: requests/s, TTFT and inter-token latency p50/p99 at concurrency 1, 8, 32"
BASELINE = "offline-generate"
REPS = (1, 5)
MODEL = "bench"


@dataclass
class Case:
    concurrency: int
    requests: int
    max_tokens: int
    device: str

    @property
    def label(self) -> str:
        return f"serve c={self.concurrency} {self.requests} requests x {self.max_tokens} tokens"

    def extra(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "max_tokens": self.max_tokens}


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case(1, 4, 16, device), Case(8, 8, 16, device)]
    return [Case(1, 8, 64, device), Case(8, 32, 64, device), Case(32, 32, 64, device)]


_CHECKPOINTS: dict = {}


def overrides(case: Case) -> list[str]:
    """The run-config overrides both providers build their engine from (a context of 256 tokens; on the CPU one
    torch thread: on a shared 2-core machine a 2-thread pool's spin-waits made a decode step up to 8x slower)."""
    over = [f"model.device={case.device}", "data.max_prompt_tokens=64", "rollout.max_response_tokens=191"]
    return over + (["train.threads=1"] if case.device == "cpu" else [])


def checkpoint(device: str) -> str:
    """A checkpoint of the model (written once per process to a temporary directory)."""
    if device not in _CHECKPOINTS:
        import os
        import tempfile
        from dataclasses import replace

        from arpo.build import create_embedded_model
        from arpo.config import load_config

        section = load_config(None, []).model
        if device.startswith("cuda"):
            section = replace(section, embedded_hidden_size=512, embedded_layers=8, embedded_heads=8,
                              embedded_kv_heads=2, embedded_intermediate_size=1536)
        _CHECKPOINTS[device] = create_embedded_model(section, os.path.join(tempfile.mkdtemp(), "bench"), seed=0)
    return _CHECKPOINTS[device]


def _engine(case: Case):
    from arpo.config import load_config
    from arpo.serve.server import load_parts

    engine, _ = load_parts(checkpoint(case.device), load_config(None, overrides(case)), case.requests)
    return engine


def _prompts(case: Case, tok) -> list[list[int]]:
    from arpo.data import embedded_examples

    return [[tok.bos_token_id] + list(tok.encode(ex.prompt, add_special_tokens=False))
            for ex in embedded_examples(case.requests, split="heldout", seed=3)]


def _params(case: Case, i: int):
    from arpo.engine import SamplingParams

    return SamplingParams(temperature=1.0, max_tokens=case.max_tokens, ignore_eos=True, seed=1000 + i)


# ---------------------------------------------------------------------------------------------------- passes
class Passes:
    """A provider's benchmark callable: each call is one pass over all requests, recorded; `extra` summarises
    the passes so far (the harness reads it after timing), `close` releases what the provider holds."""

    def __init__(self, one_pass, case: Case, close=None):
        self.one_pass, self.case, self.passes = one_pass, case, []
        self.close = close

    def __call__(self):
        stats = self.one_pass()
        self.passes.append(stats)
        return stats

    @property
    def extra(self) -> dict:
        return summarise(self.passes, self.case) if self.passes else {}


# ---------------------------------------------------------------------------------------------------- offline
def make_offline(case: Case) -> Passes:
    engine = _engine(case)
    prompts = _prompts(case, engine.tokenizer)
    params = [_params(case, i) for i in range(len(prompts))]

    def one_pass() -> dict:
        t0 = time.perf_counter()
        out = []
        for at in range(0, len(prompts), case.concurrency):
            out += engine.generate(prompts[at:at + case.concurrency], params[at:at + case.concurrency])
        return {"wall": time.perf_counter() - t0, "tokens": sum(len(c.token_ids) for c in out)}

    one_pass()  # warm-up, as for the server
    return Passes(one_pass, case)


# ---------------------------------------------------------------------------------------------------- server
def make_server(case: Case):
    """`arpo serve` on the checkpoint in a child process (port 0: it prints the port it got)."""
    import re
    import subprocess
    import sys

    from arpo.build import load_tokenizer

    argv = [sys.executable, "-m", "arpo", "serve", checkpoint(case.device), *overrides(case), "--port", "0",
            "--model-name", MODEL, "--max-seqs", str(case.requests), "--max-requests", str(max(64, case.requests))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # ends when the child exits
        seen.append(line)
        found = re.search(r"on (http://\S+)/v1", line)
        if found:
            break
    else:
        proc.wait()
        raise RuntimeError(f"arpo serve exited with status {proc.returncode}: {''.join(seen)[-2000:]}")
    url = found.group(1)
    prompts = _prompts(case, load_tokenizer(checkpoint(case.device)))

    def one_pass() -> dict:
        return asyncio.run(_drive(url, prompts, case))

    def close():
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()

    try:
        one_pass()  # warm-up: the child's first requests allocate and page in what later ones reuse
    except BaseException:
        close()
        raise
    return Passes(one_pass, case, close)


async def _one(session, url: str, prompt: list[int], case: Case, i: int, gate: asyncio.Semaphore) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": case.max_tokens, "temperature": 1.0, "seed": 1000 + i,
            "stream": True, "arpo": {"ignore_eos": True}}
    async with gate:
        t0 = time.perf_counter()
        stamps: list[float] = []
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"request {i}: HTTP {r.status}: {(await r.read()).decode()[:300]}")
            async for line in r.content:  # one SSE line at a time; a token's chunk names its `token_id`
                if b'"token_id"' in line:
                    stamps.append(time.perf_counter())
                elif line.startswith(b'data: {"error"'):
                    raise RuntimeError(f"request {i}: {json.loads(line[6:])['error']['message']}")
        return {"start": t0, "stamps": stamps}


async def _drive(url: str, prompts: list[list[int]], case: Case) -> dict:
    import aiohttp

    gate = asyncio.Semaphore(case.concurrency)
    connector = aiohttp.TCPConnector(limit=case.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        per = await asyncio.gather(*[_one(session, url, p, case, i, gate) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - t0
    return {"wall": wall, "per_request": per}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(int(round(q)), 1), 99) - 1]


def summarise(passes: list[dict], case: Case) -> dict:
    """Requests/s and tokens/s at the median pass's wall time; for the server (passes with per-request stamps)
    TTFT and ITL percentiles pooled over the passes. A pass that streamed fewer tokens than asked is an error."""
    expected = case.requests * case.max_tokens
    for k, p in enumerate(passes):
        tokens = sum(len(r["stamps"]) for r in p["per_request"]) if "per_request" in p else p["tokens"]
        if tokens != expected:
            raise RuntimeError(f"pass {k + 1} streamed {tokens} tokens, expected {expected}")
    wall = statistics.median(p["wall"] for p in passes)
    out = {"passes": len(passes), "requests_per_s": case.requests / wall, "tokens_per_s": expected / wall}
    per = [r for p in passes for r in p.get("per_request", [])]
    if per:
        ttft = [(r["stamps"][0] - r["start"]) * 1e3 for r in per if r["stamps"]]
        itl = [(b - a) * 1e3 for r in per for a, b in zip(r["stamps"], r["stamps"][1:])]
        out.update(ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
                   itl_p50_ms=percentile(itl, 50), itl_p99_ms=percentile(itl, 99))
    return out


def providers(device: str) -> dict:
    return {"offline-generate": make_offline, "server": make_server}


def summary(results) -> str:
    """Requests/s, tokens/s and the latency percentiles of each measured provider, and the throughput ratio."""
    lines = [f"{'workload':44s} {'provider':18s} {'req/s':>8s} {'tok/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
             f"{'ITL p50':>8s} {'ITL p99':>8s} {'p99/p50':>8s}  (ms)"]
    for r in results:
        e = r.extra
        lat = "".join(f" {e[k]:>9.1f}" if k.startswith("ttft") else f" {e[k]:>8.2f}"
                      for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")) if "itl_p50_ms" in e \
            else f" {'-':>9s} {'-':>9s} {'-':>8s} {'-':>8s}"
        ratio = f" {e['itl_p99_ms'] / e['itl_p50_ms']:>8.2f}" if e.get("itl_p50_ms") else f" {'-':>8s}"
        lines.append(f"{r.workload:44s} {r.provider:18s} {e['requests_per_s']:8.2f} {e['tokens_per_s']:9.0f}"
                     f"{lat}{ratio}")
    return "\n".join(lines)


def threads_note() -> str:
    return f"torch threads {torch.get_num_threads()}"
