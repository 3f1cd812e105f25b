"""Maps `arpo bench NAME` to a workload module and runs it."""
from __future__ import annotations

import importlib
import json
import os

import torch

from arpo.bench.harness import format_table, machine_name, measure

WORKLOADS = {
    "token-stats": "arpo.bench.token_stats",
    "decode": "arpo.bench.decode",
    "paged-attention": "arpo.bench.paged_attention",
    "policy-loss": "arpo.bench.policy_loss",
    "rollout": "arpo.bench.rollout",
    "serve": "arpo.bench.serve",
    "train-step": "arpo.bench.train_step",
    "tree-attention": "arpo.bench.tree_attention",
}


def _module(name: str):
    if name not in WORKLOADS:
        raise SystemExit(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(WORKLOADS))}")
    return importlib.import_module(WORKLOADS[name])


def describe() -> dict[str, str]:
    return {name: importlib.import_module(mod).DOC for name, mod in WORKLOADS.items()}


def run(name: str, device: str | None = None, quick: bool = False, only: str | None = None):
    mod = _module(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in mod.cases(device, quick):
        if only and only not in case.label:
            continue
        for provider, make in mod.providers(device).items():
            fn = None
            try:
                fn = make(case)
                if fn is None:  # provider does not apply to this case
                    continue
                warmup, reps = getattr(mod, "REPS", (2, 5))
                r = measure(case.label, provider, fn, device, warmup, reps, **case.extra())
                r.extra.update(getattr(fn, "extra", {}))  # after timing: a provider may summarise its passes
                results.append(r)
                print(f"  measured {r.workload} / {r.provider}: {r.ms:.3f} ms", flush=True)
            except torch.OutOfMemoryError:
                print(f"[{case.label}] {provider}: out of memory, skipped")
            finally:
                if getattr(fn, "close", None) is not None:  # a provider holding a resource (a server thread)
                    fn.close()
            fn = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return mod, device, results


def run_cli(name: str, device: str | None = None, quick: bool = False, out: str | None = None,
            only: str | None = None) -> int:
    mod, device, results = run(name, device, quick, only)
    print(f"# {name} on {machine_name(device)}  (torch {torch.__version__})")
    print(format_table(results, mod.BASELINE))
    for hook in ("report", "summary"):  # a workload's own columns (phase split, latency percentiles, ...)
        if hasattr(mod, hook):
            print(getattr(mod, hook)(results))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"benchmark": name, "machine": machine_name(device), "device": device,
                       "torch": torch.__version__, "results": [r.as_dict() for r in results]}, f, indent=1)
        print(f"wrote {out}")
    return 0
