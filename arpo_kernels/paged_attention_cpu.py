"""The PyTorch (CPU) path of paged attention: shared blocks attended once, ragged contexts in a few padded batches.

Why not one padded batch: a rollout's batch mixes short and long contexts, and many of its sequences sit on top of
the same cached blocks (a fork's children share the parent's blocks; every sample of a prompt shares the prompt).
Gathering every sequence's whole context padded to the longest one copies the shared blocks once per sequence
plus the padding — on the CPU that copy, not the arithmetic, is the cost.

So a batch is cut into *parts* (`split_shared`): a trie over the block tables, where each part is a run of blocks
and the sequences ("members") whose tables contain that run at the same place. A block shared by 16 sequences is
one part with 16 members: gathered once, scored against all 16 members' query rows in one SDPA. Each sequence's
own blocks form a one-member part. Parts of similar size go into one padded batch ("bucket": one gather, one SDPA;
`_buckets` weighs padding against per-call cost), and each query row's partial results — one per part on its
path — are merged through their log-sum-exps. Decodes (one query row) and prefill/extend chunks (the last q_len
tokens of a context, causal) take the same path: the mask is `key position <= query position` within the part.

`plan_torch` does this index work once per forward; every layer reuses it (same tables, same lengths).
Exact up to float rounding (tests compare with the plain references). The re-prefill way of building a tree has no
shared blocks: it gets only the ragged batching.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Relative costs for grouping parts into padded batches (measured on a 2-core EPYC, fp32, head_dim 32–64): a batch
# costs ~COST_CALL for its launches, each gathered block ~COST_BLOCK, each (query row, block) scored ~COST_SCORE.
COST_CALL = 80.0
COST_BLOCK = 2.0
COST_SCORE = 0.25


class Part(NamedTuple):
    """A run of `blocks` found at block index `start` of every member's table."""
    start: int
    blocks: list
    members: list


def split_shared(tables: list[list[int]]) -> list[Part]:
    """Cut block tables (each holding exactly a sequence's blocks) into parts: every block of every table lands
    in exactly one part, a part's members are all the tables holding its blocks at that place, and parts with
    several members are as long as their members' common run allows (the trie's edges)."""
    parts = []
    stack = [(list(range(len(tables))), 0)]
    while stack:
        members, pos = stack.pop()
        if len(members) == 1:
            table = tables[members[0]]
            if len(table) > pos:
                parts.append(Part(pos, table[pos:], members))
            continue
        first = tables[members[0]]
        stop = pos
        for column in zip(*(tables[i][pos:] for i in members)):  # up to the shortest member
            if column.count(column[0]) != len(column):
                break
            stop += 1
        if stop > pos:
            parts.append(Part(pos, first[pos:stop], members))
        children: dict[int, list[int]] = {}
        for i in members:
            if len(tables[i]) > stop:
                children.setdefault(tables[i][stop], []).append(i)
        stack.extend((group, stop) for group in children.values())
    return parts


def _cost(num_parts: int, width: int, rows: int) -> float:
    return COST_CALL + num_parts * width * (COST_BLOCK + COST_SCORE * rows)


def _buckets(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Group parts given as (blocks, query rows) into padded batches, greedily, largest first: a part joins the
    batch it makes least dearer, or opens its own when that is cheaper."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True)
    buckets: list[list] = []  # [members, width, rows, cost]
    for i in order:
        w, r = sizes[i]
        alone = _cost(1, w, r)
        best, best_extra = None, alone
        for b in buckets:
            grown = _cost(len(b[0]) + 1, max(b[1], w), max(b[2], r))
            if grown - b[3] < best_extra:
                best, best_extra = b, grown - b[3]
        if best is None:
            buckets.append([[i], w, r, alone])
        else:
            best[0].append(i)
            best[1], best[2] = max(best[1], w), max(best[2], r)
            best[3] = _cost(len(best[0]), best[1], best[2])
    return [b[0] for b in buckets]


class TorchPlan:
    """One batch's index work: its parts grouped into padded buckets, and per query row where its partial
    results land. Rows are the rows of q: one per decoding sequence, q_len per prefill/extend chunk."""

    def __init__(self, block_tables, context_lens, cu_seqlens_q, block_size: int):
        dev = block_tables.device
        self.block_size = block_size
        lens = context_lens.tolist()
        n = len(lens)
        if cu_seqlens_q is None:  # pure decode: one row per sequence
            starts, q_lens = list(range(n)), [1] * n
        else:
            cu = cu_seqlens_q.tolist()
            starts, q_lens = cu[:-1], [b - a for a, b in zip(cu, cu[1:])]
        tables = [row[:-(-length // block_size)] for row, length in zip(block_tables.tolist(), lens)]
        parts = split_shared(tables)
        rows = [list(range(s, s + q)) for s, q in zip(starts, q_lens)]
        positions = [list(range(length - q, length)) for length, q in zip(lens, q_lens)]
        part_rows = [[r for m in p.members for r in rows[m]] for p in parts]
        part_pos = [[x for m in p.members for x in positions[m]] for p in parts]
        keep = [i for i, r in enumerate(part_rows) if r]  # members with no queries this step (q_len 0) drop out
        parts, part_rows, part_pos = [parts[i] for i in keep], [part_rows[i] for i in keep], [part_pos[i] for i in keep]
        self.buckets = []
        partials: list[list[int]] = [[] for _ in range(sum(q_lens))]  # per row, its partial results' indices
        base = 0
        for members in _buckets([(len(parts[i].blocks), len(part_rows[i])) for i in range(len(parts))]):
            width = max(len(parts[i].blocks) for i in members)
            r_max = max(len(part_rows[i]) for i in members)
            idx, q_index, q_pos, first, length = [], [], [], [], []
            for j, i in enumerate(members):
                p = parts[i]
                idx += p.blocks + [p.blocks[0]] * (width - len(p.blocks))
                pad = r_max - len(part_rows[i])
                q_index += part_rows[i] + [part_rows[i][0]] * pad
                q_pos += part_pos[i] + [2**62] * pad  # padding rows see the whole part: no empty softmax
                first.append(p.start * block_size)
                length.append(len(p.blocks) * block_size)
                for k, (r, pos) in enumerate(zip(part_rows[i], part_pos[i])):
                    if pos >= p.start * block_size:  # else the row sees none of the part (masked out entirely)
                        partials[r].append(base + j * r_max + k)
            keys = torch.arange(width * block_size, device=dev)
            first_t = torch.tensor(first, device=dev)[:, None, None]
            allowed = (keys < torch.tensor(length, device=dev)[:, None, None]) & (
                first_t + keys <= torch.tensor(q_pos, device=dev).view(-1, r_max, 1))  # [P, R, L]
            self.buckets.append({"idx": torch.tensor(idx, device=dev), "width": width, "allowed": allowed,
                                 "q_index": torch.tensor(q_index, device=dev).view(-1, r_max), "masks": {}})
            base += len(members) * r_max
        depth = max((len(p) for p in partials), default=1)
        # rows on shorter paths are padded with an extra, zero-weight partial result (index `base`); at depth 2
        # with their own partial twice instead, which the two-way merge weighs 1/2 + 1/2 (no extra result needed)
        self.merge = torch.tensor([p + [p[0] if depth == 2 else base] * (depth - len(p)) for p in partials],
                                  device=dev)  # [T, depth]

    def mask(self, bucket: dict, group: int, dtype: torch.dtype) -> torch.Tensor:
        """[P, 1, R * group or 1, L] additive (0 / -inf): query rows are (row, head of the KV head's group)."""
        key = (group, dtype)
        if key not in bucket["masks"]:
            a = bucket["allowed"]
            p, r, n_keys = a.shape
            if bool((a == a[:, :1]).all()):  # every row sees the same keys (decodes): one row, broadcast
                a = a[:, None, :1]
            else:
                a = a[:, None, :, None, :].expand(p, 1, r, group, n_keys).reshape(p, 1, r * group, n_keys)
            bucket["masks"][key] = torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill(~a, float("-inf"))
        return bucket["masks"][key]


def plan_torch(k_cache, block_tables, context_lens, cu_seqlens_q=None) -> TorchPlan:
    """Precompute the CPU path's indices for a batch (pass the plan to every layer's attention call).
    `cu_seqlens_q=None`: a pure decode batch, one query row per sequence."""
    return TorchPlan(block_tables, context_lens, cu_seqlens_q, k_cache.shape[1])


# ---- attention -----------------------------------------------------------------------------------------------
def _gather_blocks(cache, idx, n: int, width: int, block_size: int) -> torch.Tensor:
    """Whole blocks of n runs of `width` blocks (one index per block, not per token): [n, Hkv, width * block, D]."""
    hkv, d = cache.shape[2:]
    return cache.index_select(0, idx).view(n, width * block_size, hkv, d).transpose(1, 2)


def _sdpa_lse(q, k, v, mask, scale):
    """SDPA that also returns the rows' log-sum-exps (for merging partial attentions). [.., R, D], [.., R].

    The CPU's flash kernel returns them; elsewhere (the PyTorch reference path run on CUDA) plain fp32 math."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                          scale=scale)
    return _sdpa_lse_math(q, k, v, mask, scale)


def _sdpa_lse_math(q, k, v, mask, scale):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # fully masked rows: output 0, lse -inf
    out = torch.matmul(torch.exp(scores - finite[..., None]), v.float())
    return out.to(q.dtype), lse


def _attend(q, k_cache, v_cache, plan: TorchPlan, scale: float) -> torch.Tensor:
    hq, d = q.shape[1:]
    hkv = k_cache.shape[2]
    group = hq // hkv
    depth = plan.merge.shape[1]
    outs, lses = [], []
    for b in plan.buckets:
        p, r = b["q_index"].shape
        k = _gather_blocks(k_cache, b["idx"], p, b["width"], plan.block_size)
        v = _gather_blocks(v_cache, b["idx"], p, b["width"], plan.block_size)
        # a KV head's query heads become query rows: one [R * group, L] attention per KV head, no K/V repeat
        qb = q[b["q_index"].view(-1)].view(p, r, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(p, hkv, r * group, d)
        out, lse = _sdpa_lse(qb, k, v, plan.mask(b, group, q.dtype), scale)
        outs.append(out.view(p, hkv, r, group, d).permute(0, 2, 1, 3, 4).reshape(p * r, hq, d))
        if depth > 1:  # the log-sum-exps only weigh partial results against each other
            lses.append(lse.view(p, hkv, r, group).permute(0, 2, 1, 3).reshape(p * r, hq))
    if depth <= 2:
        out_all = outs[0] if len(outs) == 1 else torch.cat(outs)
        first = out_all.index_select(0, plan.merge[:, 0])
        if depth == 1:  # every row on one part: no merging
            return first
        # softmax over the union of two parts = the two partial results weighted by their shares of the mass
        lse_all = lses[0] if len(lses) == 1 else torch.cat(lses)
        share = torch.sigmoid(lse_all.index_select(0, plan.merge[:, 0]) - lse_all.index_select(0, plan.merge[:, 1]))
        return torch.lerp(out_all.index_select(0, plan.merge[:, 1]), first, share[..., None].to(q.dtype))
    # the same over any number of parts, through a softmax of their log-sum-exps
    outs.append(q.new_zeros(1, hq, d))
    lses.append(torch.full((1, hq), float("-inf"), dtype=lses[0].dtype, device=q.device))
    out_all, lse_all = torch.cat(outs), torch.cat(lses)
    weights = torch.softmax(lse_all[plan.merge].float(), dim=1)  # [T, depth, Hq]
    merged = (weights[..., None] * out_all[plan.merge].float()).sum(1)
    return merged.to(q.dtype)


def _decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, plan=None):
    """Decode attention on the PyTorch path (see the module docstring)."""
    plan = plan or plan_torch(k_cache, block_tables, context_lens)
    return _attend(q, k_cache, v_cache, plan, scale)


def _prefill_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, plan=None):
    """Prefill/extend chunks (and decodes mixed in) on the PyTorch path: the same parts and buckets, causal."""
    if q.shape[0] == 0:
        return torch.empty_like(q)
    plan = plan or plan_torch(k_cache, block_tables, context_lens, cu_seqlens_q)
    return _attend(q, k_cache, v_cache, plan, scale)


# ---- the compiled decode step's attention (arpo.engine.compiled_decode) ---------------------------------------
def _plain_part(tables, lens, block_size: int) -> dict:
    """Every sequence's whole table, padded to the widest: static shapes, no host work (torch.compile traces it)."""
    width = tables.shape[1]
    valid = torch.arange(width * block_size, device=lens.device)[None, :] < lens[:, None]
    return {"idx": tables.reshape(-1), "width": width, "mask": valid[:, None, None, :]}


def _attend_plain(q, k_cache, v_cache, part, block_size: int, scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    k = _gather_blocks(k_cache, part["idx"], n, part["width"], block_size)
    v = _gather_blocks(v_cache, part["idx"], n, part["width"], block_size)
    out = F.scaled_dot_product_attention(q.view(n, hkv, hq // hkv, d), k, v, attn_mask=part["mask"], scale=scale)
    return out.reshape(n, hq, d)
