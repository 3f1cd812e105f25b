"""`arpo bench token-stats` providers run on tiny shapes, the compiled one through the compiled bodies
(forward and backward), the eager one never."""
import torch

from arpo.bench import token_stats as workload
from arpo_kernels import token_stats_compiled


def test_every_cpu_provider_runs_and_eager_is_uncompiled(monkeypatch):
    providers = workload.providers("cpu")
    assert {"naive", "torch.compile", "arpo-torch", "arpo-torch fused loss", "arpo-torch eager",
            "matmuls"} <= set(providers)
    seen = []
    real_run = token_stats_compiled._run

    def spy(name, *args):
        seen.append((name, token_stats_compiled.available()))
        return real_run(name, *args)

    monkeypatch.setattr(token_stats_compiled, "_run", spy)
    for kind in ("logits", "linear"):
        case = workload.Case(kind, 8, 16, 64, torch.float32, "cpu")
        for name, make in providers.items():
            fn = make(case)
            if fn is None:
                continue
            seen.clear()
            fn()
            if name == "arpo-torch":  # forward and backward through the compiled bodies
                assert "forward" in {n for n, _ in seen} and any(n.startswith("backward") for n, _ in seen)
                assert all(compiled for _, compiled in seen), seen
            elif name == "arpo-torch eager":  # the eager chunked ops, never the compiled bodies
                assert seen == []
