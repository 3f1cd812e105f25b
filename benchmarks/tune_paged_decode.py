"""Sweep the paged-decode launch knobs on the current GPU; prints GB/s of K/V read (CUDA only).

    python benchmarks/tune_paged_decode.py   # then set DECODE_LAUNCH / _PROGRAMS_PER_SM in paged_attention.py
"""
import itertools

import torch
import triton.testing

import arpo_kernels.paged_attention as pa


def main() -> None:
    hq, hkv, d, bs = 16, 2, 128, 16
    for bsz, ctx in ((64, 4096), (16, 4096), (64, 1024)):
        nblk = bsz * ctx // bs
        k = torch.randn(nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        tables = torch.randperm(nblk, device="cuda", dtype=torch.int32).view(bsz, ctx // bs)
        lens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(bsz, hq, d, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * bsz * ctx * hkv * d * 2
        for pps, bn, warps, stages in itertools.product((4, 8, 16), (32, 64, 128), (4, 8), (2, 3, 4)):
            pa._PROGRAMS_PER_SM = pps
            pa.DECODE_LAUNCH.update(block_n=bn, num_warps=warps, num_stages=stages)
            try:
                ms = triton.testing.do_bench(lambda: pa.paged_decode_attention(q, k, v, tables, lens,
                                                                               max_context_len=ctx),
                                             warmup=5, rep=20)
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                print(f"B={bsz} ctx={ctx} pps={pps} bn={bn} w={warps} s={stages}: failed {type(e).__name__}")
                continue
            print(f"B={bsz:3d} ctx={ctx} pps={pps:2d} bn={bn:3d} w={warps} s={stages}: {ms * 1e3:7.1f} us "
                  f"{nbytes / ms / 1e6:6.0f} GB/s")


if __name__ == "__main__":
    main()
