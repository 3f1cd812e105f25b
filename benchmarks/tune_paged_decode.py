"""Sweep the paged-decode launch knobs on the current GPU; prints GB/s of K/V read (CUDA only).

    python benchmarks/tune_paged_decode.py                       # the full grid on three shapes
    python benchmarks/tune_paged_decode.py --shapes 64x4096 --pps 2,4,8,16 --block-n 32,64 --warps 4
Then set DECODE_LAUNCH / _PROGRAMS_PER_SM in arpo_kernels/paged_attention.py to the best row.
"""
import argparse
import itertools

import torch
import triton.testing

import arpo_kernels.paged_attention as pa


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x4096,16x4096,64x1024", help="batch x context, comma-separated")
    ap.add_argument("--pps", type=_ints, default=(4, 8, 16), help="programs per SM the splits aim for")
    ap.add_argument("--block-n", type=_ints, default=(32, 64, 128))
    ap.add_argument("--warps", type=_ints, default=(4, 8))
    ap.add_argument("--stages", type=_ints, default=(2, 3, 4))
    ap.add_argument("--rep", type=int, default=20, help="do_bench's timed milliseconds per setting")
    args = ap.parse_args()
    hq, hkv, d, bs = 16, 2, 128, 16
    best: dict[str, tuple[float, str]] = {}
    for shape in args.shapes.split(","):
        bsz, ctx = (int(x) for x in shape.split("x"))
        nblk = bsz * ctx // bs
        k = torch.randn(nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        tables = torch.randperm(nblk, device="cuda", dtype=torch.int32).view(bsz, ctx // bs)
        lens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(bsz, hq, d, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * bsz * ctx * hkv * d * 2
        for pps, bn, warps, stages in itertools.product(args.pps, args.block_n, args.warps, args.stages):
            pa._PROGRAMS_PER_SM = pps
            pa.DECODE_LAUNCH.update(block_n=bn, num_warps=warps, num_stages=stages)
            setting = f"pps={pps:2d} bn={bn:3d} w={warps} s={stages}"
            try:
                ms = triton.testing.do_bench(lambda: pa.paged_decode_attention(q, k, v, tables, lens,
                                                                               max_context_len=ctx),
                                             warmup=5, rep=args.rep)
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                print(f"B={bsz} ctx={ctx} {setting}: failed {type(e).__name__}")
                continue
            print(f"B={bsz:3d} ctx={ctx} {setting}: {ms * 1e3:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)
            if shape not in best or ms < best[shape][0]:
                best[shape] = (ms, setting)
    for shape, (ms, setting) in best.items():
        print(f"best {shape}: {setting} {ms * 1e3:.1f} us")


if __name__ == "__main__":
    main()
