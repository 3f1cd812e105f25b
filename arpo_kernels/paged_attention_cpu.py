"""The PyTorch (CPU) path of paged attention: gather whole blocks, SDPA, batched over sequences.

Why a plan: the block tables and lengths are the same for every layer of a forward, so the index work (which
blocks to gather, masks, which rows are decodes and which are prefill chunks) is done once per batch
(`plan_torch`) and each layer only gathers and attends.

Shared prefixes (cascade attention, CPU tensors only: it needs the CPU SDPA kernel's log-sum-exps): in a rollout tree many sequences decode on top of the same cached prompt —
a fork's children share its blocks. Attending to each sequence's whole context would gather and score the shared
blocks once per sequence. Instead, sequences whose tables start with the same blocks form a group: the group's
queries attend to the shared blocks together (one gather, one SDPA with all members' query rows), each sequence
attends to its own tail, and the two partial softmaxes are merged through their log-sum-exps. Same result up to
float rounding; the re-prefill way of building a tree has no shared blocks and gets no such saving.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_SHARED_BLOCKS = 2  # a group's shared prefix must span at least this many blocks to take the cascade path
CASCADE_MAX_GATHER = 0.5  # ... and the cascade must gather at most this share of the blocks the plain path would


class TorchPlan:
    """One batch's index work. Rows split into single-token chunks (decodes: one query against the whole context,
    with shared-prefix groups) and multi-token chunks (prefill or `extend`: queries padded to the longest chunk,
    causal within the context)."""

    def __init__(self, block_tables, context_lens, cu_seqlens_q, num_blocks: int, block_size: int):
        dev = block_tables.device
        self.block_size = block_size
        tables = block_tables.long().clamp(0, num_blocks - 1)  # entries past a length may be garbage
        lens = context_lens.long()
        if cu_seqlens_q is None:  # pure decode
            single = torch.ones(lens.shape[0], dtype=torch.bool, device=dev)
            starts = torch.arange(lens.shape[0], device=dev)
            q_lens = torch.ones_like(lens)
        else:
            cu = cu_seqlens_q.long()
            starts, q_lens = cu[:-1], cu[1:] - cu[:-1]
            single = q_lens == 1
        self.all_single = bool(single.all())
        self.decode = None
        if bool(single.any()):
            rows = None if self.all_single else starts[single]
            cascade = _cascade_part(tables[single], lens[single], block_size, rows) if dev.type == "cpu" else None
            self.decode = cascade or _plain_part(tables[single], lens[single], block_size, rows)
        self.multi = None if self.all_single else _multi_part(tables[~single], lens[~single], starts[~single],
                                                              q_lens[~single], block_size)
        self._masks: dict = {}

    def multi_mask(self, group: int) -> torch.Tensor:
        """[M, 1, Qmax * group, L]: query rows ordered (token, group member), as `_attend_multi` lays them out."""
        if group not in self._masks:
            a = self.multi["allowed"]
            self._masks[group] = a[:, :, None, :].expand(-1, -1, group, -1).reshape(a.shape[0], 1, -1, a.shape[2])
        return self._masks[group]


def plan_torch(k_cache, block_tables, context_lens, cu_seqlens_q=None) -> TorchPlan:
    """Precompute the CPU path's indices for a batch (pass the plan to every layer's attention call)."""
    return TorchPlan(block_tables, context_lens, cu_seqlens_q, k_cache.shape[0], k_cache.shape[1])


# ---- plans ---------------------------------------------------------------------------------------------------
def _plain_part(tables, lens, block_size: int, rows) -> dict:
    width = tables.shape[1]
    valid = torch.arange(width * block_size, device=lens.device)[None, :] < lens[:, None]
    return {"kind": "plain", "rows": rows, "idx": tables.reshape(-1), "width": width,
            "mask": valid[:, None, None, :]}


def _shared_groups(tables: list[list[int]], lens: list[int], block_size: int) -> list[tuple[list[int], int]]:
    """(members, shared tokens) for every set of >= 2 sequences whose tables begin with the same blocks."""
    by_first: dict[int, list[int]] = {}
    for i, t in enumerate(tables):
        by_first.setdefault(t[0], []).append(i)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        shortest = min(lens[i] for i in members)
        n = -(-shortest // block_size)
        common = 0
        first = tables[members[0]]
        while common < n and all(tables[i][common] == first[common] for i in members):
            common += 1
        shared = min(common * block_size, shortest)
        if shared >= MIN_SHARED_BLOCKS * block_size:
            groups.append((members, shared))
    return groups


def _cascade_part(tables, lens, block_size: int, rows) -> dict | None:
    """The shared-prefix split of a decode batch, or None when no group shares enough blocks."""
    host_tables, host_lens = tables.tolist(), lens.tolist()
    groups = _shared_groups(host_tables, host_lens, block_size)
    if not groups:
        return None
    dev = tables.device
    n = len(host_lens)
    shared = [0] * n
    for members, s in groups:
        for i in members:
            shared[i] = s
    # shared part: per group its first blocks, queries of its members (padded to the largest group)
    s_width = max(-(-s // block_size) for _, s in groups)
    m_max = max(len(m) for m, _ in groups)
    s_idx = [host_tables[m[0]][:s_width] + [0] * (s_width - len(host_tables[m[0]][:s_width])) for m, _ in groups]
    s_rows = [m + [m[0]] * (m_max - len(m)) for m, _ in groups]
    s_lens = torch.tensor([s for _, s in groups], device=dev)
    s_valid = torch.arange(s_width * block_size, device=dev)[None, :] < s_lens[:, None]
    s_of_seq = [0] * n  # each sequence's row among the shared part's outputs
    for g, (members, _) in enumerate(groups):
        for j, i in enumerate(members):
            s_of_seq[i] = g * m_max + j
    # tail part: each sequence's blocks from its shared prefix's last (possibly partial) block on
    starts = [s // block_size for s in shared]
    ends = [-(-n_tok // block_size) for n_tok in host_lens]
    t_width = max(e - b for b, e in zip(starts, ends))
    if len(groups) * s_width + n * t_width > CASCADE_MAX_GATHER * n * tables.shape[1]:
        return None  # too little shared to pay for the extra SDPA and the merge
    t_idx = [host_tables[i][starts[i]:ends[i]] + [0] * (t_width - ends[i] + starts[i]) for i in range(n)]
    base = torch.tensor(starts, device=dev)[:, None] * block_size
    pos = base + torch.arange(t_width * block_size, device=dev)[None, :]
    t_valid = (pos >= torch.tensor(shared, device=dev)[:, None]) & (pos < lens[:, None])
    in_group = torch.tensor(shared, device=dev) > 0
    inf = torch.tensor(float("inf"), device=dev)
    bias = torch.where(in_group, 0.0, -inf) + torch.where(t_valid.any(1), 0.0, inf)  # never both: see merge
    bias = bias[:, None]
    return {
        "kind": "cascade", "rows": rows,
        "s_idx": torch.tensor(s_idx, dtype=torch.long, device=dev).reshape(-1), "s_width": s_width,
        "s_rows": torch.tensor(s_rows, dtype=torch.long, device=dev), "s_valid": s_valid,
        "s_of_seq": torch.tensor(s_of_seq, dtype=torch.long, device=dev), "bias": bias,
        "t_idx": torch.tensor(t_idx, dtype=torch.long, device=dev).reshape(-1), "t_width": t_width, "t_valid": t_valid,
        "masks": {},
    }


def _multi_part(tables, lens, starts, q_lens, block_size: int) -> dict:
    width = tables.shape[1]
    q_max = int(q_lens.max())
    i = torch.arange(q_max, device=lens.device)
    q_valid = i[None, :] < q_lens[:, None]                                 # [M, Qmax]
    q_index = torch.where(q_valid, starts[:, None] + i[None, :], 0)        # padding reads row 0
    q_pos = (lens - q_lens)[:, None] + i[None, :]                          # absolute positions
    q_pos = torch.minimum(q_pos, (lens - 1)[:, None])                      # padded rows: stay in context
    keys = torch.arange(width * block_size, device=lens.device)
    allowed = keys[None, None, :] <= q_pos[:, :, None]                     # [M, Qmax, L] causal
    return {"idx": tables.reshape(-1), "width": width, "q_index": q_index, "q_valid": q_valid,
            "allowed": allowed, "rows": q_index[q_valid]}


# ---- attention -----------------------------------------------------------------------------------------------
def _gather_blocks(cache, idx, n: int, width: int, block_size: int) -> torch.Tensor:
    """Whole blocks of n sequences' tables (one index per block, not per token): [n, Hkv, width * block, D]."""
    hkv, d = cache.shape[2:]
    return cache.index_select(0, idx).view(n, width * block_size, hkv, d).transpose(1, 2)


def _additive(valid: torch.Tensor, dtype: torch.dtype, cache: dict, key: str) -> torch.Tensor:
    """A bool mask as 0 / -inf in `dtype` (the SDPA op that also returns log-sum-exps takes no bool mask)."""
    if (key, dtype) not in cache:
        cache[(key, dtype)] = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(
            ~valid, float("-inf"))
    return cache[(key, dtype)]


def _sdpa_lse(q, k, v, mask, scale):
    """SDPA that also returns the rows' log-sum-exps (for merging partial attentions). [.., R, D], [.., R]."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                      scale=scale)


def _attend_plain(q, k_cache, v_cache, part, block_size: int, scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    k = _gather_blocks(k_cache, part["idx"], n, part["width"], block_size)
    v = _gather_blocks(v_cache, part["idx"], n, part["width"], block_size)
    # a KV head's query heads as its query rows: one [group, L] attention per KV head, no K/V repeat
    # (2-3x faster on the CPU than SDPA's enable_gqa with one query row)
    out = F.scaled_dot_product_attention(q.view(n, hkv, hq // hkv, d), k, v, attn_mask=part["mask"], scale=scale)
    return out.reshape(n, hq, d)


def _attend_cascade(q, k_cache, v_cache, part, block_size: int, scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    # shared prefixes: [groups, Hkv, members * group, D] queries against each group's shared blocks
    rows = part["s_rows"]
    g, m = rows.shape
    qs = q[rows.reshape(-1)].view(g, m, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(g, hkv, m * group, d)
    ks = _gather_blocks(k_cache, part["s_idx"], g, part["s_width"], block_size)
    vs = _gather_blocks(v_cache, part["s_idx"], g, part["s_width"], block_size)
    s_mask = _additive(part["s_valid"], q.dtype, part["masks"], "s")[:, None, None, :]
    out_s, lse_s = _sdpa_lse(qs, ks, vs, s_mask, scale)
    out_s = out_s.view(g, hkv, m, group, d).permute(0, 2, 1, 3, 4).reshape(g * m, hq, d)
    lse_s = lse_s.view(g, hkv, m, group).permute(0, 2, 1, 3).reshape(g * m, hq)
    out_s = out_s.index_select(0, part["s_of_seq"])  # per sequence (rows of sequences in no group: unused)
    lse_s = lse_s.index_select(0, part["s_of_seq"])
    if part["t_width"] == 0:  # every sequence's context is its group's shared prefix (just forked)
        return out_s
    # tails: every sequence against its own blocks past the shared prefix (sequences in no group: everything)
    kt = _gather_blocks(k_cache, part["t_idx"], n, part["t_width"], block_size)
    vt = _gather_blocks(v_cache, part["t_idx"], n, part["t_width"], block_size)
    t_mask = _additive(part["t_valid"], q.dtype, part["masks"], "t")[:, None, None, :]
    out_t, lse_t = _sdpa_lse(q.view(n, hkv, group, d), kt, vt, t_mask, scale)
    # merge: softmax over the union = the partial results weighted by their shares of the total mass; the shared
    # part's weight is sigmoid(lse_s - lse_t), with lse_s = -inf for sequences in no group and lse_t = -inf for
    # empty tails (`bias` adds those infinities)
    w = torch.sigmoid(lse_s - lse_t.reshape(n, hq) + part["bias"])
    return torch.lerp(out_t.reshape(n, hq, d), out_s, w[..., None].to(q.dtype))


def _attend_decode(q, k_cache, v_cache, part, block_size: int, scale: float) -> torch.Tensor:
    if part["kind"] == "cascade":
        return _attend_cascade(q, k_cache, v_cache, part, block_size, scale)
    return _attend_plain(q, k_cache, v_cache, part, block_size, scale)


def _attend_multi(q, k_cache, v_cache, plan: TorchPlan, scale: float) -> torch.Tensor:
    part = plan.multi
    m, q_max = part["q_index"].shape
    hq, d = q.shape[1:]
    hkv = k_cache.shape[2]
    group = hq // hkv
    k = _gather_blocks(k_cache, part["idx"], m, part["width"], plan.block_size)
    v = _gather_blocks(v_cache, part["idx"], m, part["width"], plan.block_size)
    qp = q[part["q_index"]].view(m, q_max, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(m, hkv, q_max * group, d)
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=plan.multi_mask(group), scale=scale)
    out = out.view(m, hkv, q_max, group, d).permute(0, 2, 1, 3, 4).reshape(m, q_max, hq, d)
    return out[part["q_valid"]]


def _decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, plan=None):
    """Decode attention on the PyTorch path (see the module docstring)."""
    plan = plan or plan_torch(k_cache, block_tables, context_lens)
    return _attend_decode(q, k_cache, v_cache, plan.decode, plan.block_size, scale)


def _prefill_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, plan=None):
    """Mixed steps on the PyTorch path: decode rows batched as in `_decode_torch`, chunks batched and padded."""
    if q.shape[0] == 0:
        return torch.empty_like(q)
    plan = plan or plan_torch(k_cache, block_tables, context_lens, cu_seqlens_q)
    if plan.all_single:
        return _attend_decode(q, k_cache, v_cache, plan.decode, plan.block_size, scale)
    out = torch.empty_like(q)
    if plan.decode is not None:
        rows = plan.decode["rows"]
        out[rows] = _attend_decode(q[rows], k_cache, v_cache, plan.decode, plan.block_size, scale)
    out[plan.multi["rows"]] = _attend_multi(q, k_cache, v_cache, plan, scale)
    return out
