"""Tree packing: every tree token forwarded once, the loss computed exactly as on one row per leaf.

Why: with one row per leaf, a prefix shared by k leaves (the prompt, and everything before a branch point) is
forwarded and back-propagated k times. Here the batch is one flat sequence: for each tree its prompt, then its
segments in id order (parents before children). Each token gets
- position id = its depth along its path (what it would have in its own leaf row), and
- attention to its ancestors only: a token of node n (the prompt or a segment) sees the earlier tokens of n and
  every token of n's ancestor nodes. That is causal attention along each leaf's row, so hidden states equal the
  per-leaf forwards. Trees never see each other (the mask is block-diagonal across trees).

Log-probs are computed per *target* token, not per packed row: the last token of a segment with several children
predicts several different next tokens. For each loss token (loss_mask 1), `pred_index` is the packed row whose
hidden state predicts it — the previous token of its segment, or for a segment's first token the last token of
its nearest non-empty ancestor (else the prompt's last token). The trainer does

    hidden = model(batch.input_ids, batch.position_ids, mask=batch.attention_mask())
    loss, metrics = segmented_policy_loss_from_hidden(hidden, lm_head.weight, batch.targets, batch.old_logprobs,
                                                      batch.loss_weights("soft", "token-mean"),
                                                      index=batch.pred_index)

The ancestor structure is kept compact (`token_node`, `node_parent`) so that other attention backends (a
flex_attention mask_mod: `anc[token_node[q], token_node[k]] & (k <= q)`) can use it; `attention_mask()` builds
the dense bool [L, L] mask for SDPA (now the tests' reference), `node_blocks()` a sparse per-node layout (queries
of one node against the rows of its path) whose cost is Σ len · path length instead of L² — dense-mask attention
over a whole packed tree does several times the attention work of the per-leaf rows — and `token_intervals()` two
int arrays per token for the tree-attention kernel (`arpo_kernels.tree_attention`, the trainer's CUDA path).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from arpo.algo.advantages import (
    MODES,
    check_choice,
    hard_coefficients,
    hard_token_weights,
    leaf_weights,
    soft_coefficients,
    tree_advantages,
)
from arpo.rollout.tree import ROOT, RolloutTree
from arpo_kernels.policy_loss import PolicyLossWeights


@dataclass
class PackedBatch:
    """Flat, tree-packed training batch. L packed tokens, S nodes (one prompt node per tree + its segments),
    K loss tokens, M leaves over all trees."""

    input_ids: torch.Tensor      # [L] long
    position_ids: torch.Tensor   # [L] long, depth along the path
    token_node: torch.Tensor     # [L] long, node of each packed token
    loss_mask: torch.Tensor      # [L] long, 1 = trained on (never for prompt tokens)
    node_parent: torch.Tensor    # [S] long, parent node, -1 for a prompt node
    node_tree: torch.Tensor      # [S] long
    tree_offsets: torch.Tensor   # [B + 1] long, packed range of each tree
    target_index: torch.Tensor   # [K] long, packed row of each loss token
    pred_index: torch.Tensor     # [K] long, packed row whose hidden state predicts it
    targets: torch.Tensor        # [K] long, its token id
    old_logprobs: torch.Tensor   # [K] float32, behaviour log-probs
    target_node: torch.Tensor    # [K] long
    membership: torch.Tensor     # [S, M] bool, node on leaf's path (prompt nodes: every leaf of the tree)
    leaf_tree: torch.Tensor      # [M] long
    leaf_lengths: torch.Tensor   # [M] long, loss tokens per leaf
    advantages: torch.Tensor     # [M] float64, per-leaf Â
    num_duplicated_tokens: int   # tokens the same leaves take as separate rows (prompt included)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        return PackedBatch(**moved)

    def node_ancestors(self) -> torch.Tensor:
        """bool [S, S]: anc[n, m] = m is n or an ancestor of n."""
        parent = self.node_parent.tolist()
        anc = torch.eye(len(parent), dtype=torch.bool)
        for n, p in enumerate(parent):  # parents come first, so their rows are complete
            if p >= 0:
                anc[n] |= anc[p]
        return anc.to(self.node_parent.device)

    def attention_mask(self) -> torch.Tensor:
        """bool [L, L]: True where query row q may attend to key row k (ancestor-or-self node and k <= q)."""
        anc = self.node_ancestors()
        node = self.token_node
        idx = torch.arange(node.numel(), device=node.device)
        return anc[node][:, node] & (idx[None, :] <= idx[:, None])

    def token_intervals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(enter, exit) int32 [L]: the depth-first pre-order index of each token's node and the largest one in
        that node's subtree — `arpo_kernels.tree_attention`'s form of `attention_mask()`: key k is visible to
        query q iff k <= q and enter[k] <= enter[q] <= exit[k]. O(S) host work, no [L, L] tensor."""
        parent = self.node_parent.tolist()
        children: list[list[int]] = [[] for _ in parent]
        for n, p in enumerate(parent):
            if p >= 0:
                children[p].append(n)
        pre, last, count = [0] * len(parent), [0] * len(parent), 0
        for root in (n for n, p in enumerate(parent) if p < 0):
            stack = [(root, False)]
            while stack:  # iterative DFS: trees may be deeper than Python's recursion limit
                n, done = stack.pop()
                if done:
                    last[n] = count - 1
                    continue
                pre[n], count = count, count + 1
                stack.append((n, True))
                stack.extend((c, False) for c in reversed(children[n]))
        node = self.token_node
        dev = node.device
        enter = torch.tensor(pre, dtype=torch.int32, device=dev)[node]
        exit = torch.tensor(last, dtype=torch.int32, device=dev)[node]
        return enter, exit

    def node_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse layout of the same attention: one block per non-empty node.

        Returns q_rows [N, Smax] (the node's packed rows), kv_rows [N, Pmax] (the rows of its ancestors then its
        own, in order), both padded with -1, and allowed [N, Smax, Pmax] bool. Attention computed block by block
        (gather q / k / v rows, SDPA with `allowed`, scatter back) equals `attention_mask()` attention but costs
        Σ_nodes len · path length instead of L², which is what makes packing pay off on long trees.
        """
        node = self.token_node.cpu()
        rows_of = [[] for _ in range(self.node_parent.numel())]
        for r, n in enumerate(node.tolist()):
            rows_of[n].append(r)
        parent = self.node_parent.tolist()
        path_rows: list[list[int]] = []
        for n, p in enumerate(parent):  # parents come first
            path_rows.append((path_rows[p] if p >= 0 else []) + rows_of[n])
        keep = [n for n in range(len(parent)) if rows_of[n]]
        s_max = max((len(rows_of[n]) for n in keep), default=0)
        p_max = max((len(path_rows[n]) for n in keep), default=0)
        q_rows = torch.full((len(keep), s_max), -1, dtype=torch.long)
        kv_rows = torch.full((len(keep), p_max), -1, dtype=torch.long)
        for i, n in enumerate(keep):
            q_rows[i, : len(rows_of[n])] = torch.tensor(rows_of[n])
            kv_rows[i, : len(path_rows[n])] = torch.tensor(path_rows[n])
        allowed = (kv_rows[:, None, :] <= q_rows[:, :, None]) & (kv_rows[:, None, :] >= 0) & (q_rows[:, :, None] >= 0)
        dev = self.token_node.device
        return q_rows.to(dev), kv_rows.to(dev), allowed.to(dev)

    def loss_weights(self, mode: str = "soft", aggregation: str = "token-mean") -> PolicyLossWeights:
        """Per-loss-token coefficients for `segmented_policy_loss` (see arpo.algo.advantages for definitions)."""
        check_choice("mode", mode, MODES)
        if mode == "soft":
            seg = soft_coefficients(self.membership, self.advantages, leaf_weights(self.leaf_lengths, aggregation))
        else:
            node_tokens = torch.bincount(self.target_node, minlength=self.membership.shape[0])
            c = hard_token_weights(self.membership, self.leaf_lengths, node_tokens, aggregation)
            seg = hard_coefficients(self.membership, self.advantages, c)
        return PolicyLossWeights(*(t.float()[self.target_node] for t in seg))


def pack_trees(trees: list[RolloutTree], advantages: list | None = None, eps: float = 1e-6) -> PackedBatch:
    """Pack trees into one flat sequence. `advantages`: per tree, one value per leaf; default: each tree's
    leaves normalised as one group (`group_advantages(tree.rewards(), eps)`)."""
    if not trees:
        raise ValueError("pack_trees needs at least one tree")
    if advantages is not None and len(advantages) != len(trees):
        raise ValueError(f"advantages has {len(advantages)} entries for {len(trees)} trees")
    ids, pos, tok_node, mask = [], [], [], []
    node_parent, node_tree, offsets = [], [], [0]
    tgt_index, pred_index, targets, old_lp, tgt_node = [], [], [], [], []
    member_rows, leaf_tree, leaf_len, adv = [], [], [], []
    n_leaves_before, dup = 0, 0
    for b, tree in enumerate(trees):
        tree.validate()
        a = tree_advantages(tree, b, advantages, eps)
        base = len(ids)
        prompt_node = len(node_parent)
        node_parent.append(-1)
        node_tree.append(b)
        p_len = len(tree.prompt_ids)
        ids += tree.prompt_ids
        pos += range(p_len)
        tok_node += [prompt_node] * p_len
        mask += [0] * p_len
        last_row = {ROOT: base + p_len - 1}  # segment -> packed row of the last token on its path
        for s in tree.segments:
            node = len(node_parent)
            node_parent.append(prompt_node if s.parent == ROOT else prompt_node + 1 + s.parent)
            node_tree.append(b)
            start, depth = len(ids), tree.depth_offset(s.id)
            prev = last_row[s.parent]
            for j, (t, lp, m) in enumerate(zip(s.token_ids, s.logprobs, s.loss_mask)):
                row = start + j
                if m:
                    tgt_index.append(row)
                    pred_index.append(prev)
                    targets.append(t)
                    old_lp.append(lp)
                    tgt_node.append(node)
                prev = row
            ids += s.token_ids
            pos += range(depth, depth + len(s))
            tok_node += [node] * len(s)
            mask += s.loss_mask
            last_row[s.id] = prev
        offsets.append(len(ids))
        # Leaf membership of this tree's nodes (rows are filled per tree, then padded to all leaves below).
        n_nodes = 1 + len(tree.segments)
        mem = torch.zeros(n_nodes, len(tree.leaves), dtype=torch.bool)
        mem[0] = True
        for j, leaf in enumerate(tree.leaves):
            path = tree.path(leaf)
            mem[[1 + s for s in path], j] = True
            leaf_len.append(sum(sum(tree.segments[s].loss_mask) for s in path))
            dup += p_len + sum(len(tree.segments[s]) for s in path)
        member_rows.append((n_leaves_before, mem))
        leaf_tree += [b] * len(tree.leaves)
        adv.append(a)
        n_leaves_before += len(tree.leaves)
    membership = torch.zeros(len(node_parent), n_leaves_before, dtype=torch.bool)
    r = 0
    for col, mem in member_rows:
        membership[r:r + mem.shape[0], col:col + mem.shape[1]] = mem
        r += mem.shape[0]
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedBatch(
        input_ids=long(ids), position_ids=long(pos), token_node=long(tok_node), loss_mask=long(mask),
        node_parent=long(node_parent), node_tree=long(node_tree), tree_offsets=long(offsets),
        target_index=long(tgt_index), pred_index=long(pred_index), targets=long(targets),
        old_logprobs=torch.tensor(old_lp, dtype=torch.float32), target_node=long(tgt_node),
        membership=membership, leaf_tree=long(leaf_tree), leaf_lengths=long(leaf_len),
        advantages=torch.cat(adv) if adv else torch.zeros(0, dtype=torch.float64), num_duplicated_tokens=dup,
    )
