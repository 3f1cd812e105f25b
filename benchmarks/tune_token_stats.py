"""Sweep (BLOCK_V, num_warps) of the token-stats row kernels on the current GPU and print GB/s.

    python benchmarks/tune_token_stats.py   # CUDA only; edit CUDA_LAUNCH in arpo_kernels/token_stats.py
"""
import itertools

import torch
import triton.testing

import arpo_kernels.token_stats as ts


def main() -> None:
    V = 151936
    for T in (1024, 4096, 16384):
        logits = torch.randn(T, V, device="cuda", dtype=torch.bfloat16)
        targets = torch.randint(0, V, (T,), device="cuda")
        g = torch.randn(T, device="cuda")
        for which, (block, warps) in itertools.product(("fwd", "bwd"), itertools.product((2048, 4096, 8192, 16384),
                                                                                         (4, 8, 16))):
            ts.CUDA_LAUNCH[which] = (block, warps)
            lp, ent, lse = ts._stats_fwd_triton(logits, targets, 1.0, -100)
            if which == "fwd":
                fn = lambda: ts._stats_fwd_triton(logits, targets, 1.0, -100)  # noqa: E731
                nbytes = T * V * 2
            else:
                out = torch.empty_like(logits)
                fn = lambda: ts._stats_bwd_triton(logits, targets, lse, ent, g, g, 1.0, -100, out)  # noqa: E731
                nbytes = 2 * T * V * 2
            ms = triton.testing.do_bench(fn, warmup=5, rep=30)
            print(f"T={T:6d} {which} BLOCK_V={block:6d} warps={warps:2d}: {ms:8.3f} ms {nbytes / ms / 1e6:7.0f} GB/s")
        del logits


if __name__ == "__main__":
    main()
