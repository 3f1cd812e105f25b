"""Helpers shared by the algo tests: where each per-leaf row position sits in the packed batch."""
import pytest
import torch


def packed_row_map(batch, trees, rows) -> torch.Tensor:
    """[R, Lmax] long: the packed row holding each (leaf row, position); 0 on padding.

    Built from the trees' paths and the batch's `token_node`/`tree_offsets` only, independently of the
    packing's own bookkeeping of positions and predecessors.
    """
    out = torch.zeros_like(rows.input_ids)
    node_base, r = 0, 0
    for b, tree in enumerate(trees):
        start = int(batch.tree_offsets[b])
        node_rows = [(batch.token_node == node_base + n).nonzero()[:, 0] for n in range(1 + len(tree.segments))]
        for leaf in tree.leaves:
            parts = [node_rows[0]] + [node_rows[1 + s] for s in tree.path(leaf)]
            idx = torch.cat(parts)
            assert int(idx.min()) >= start
            out[r, : idx.numel()] = idx
            r += 1
        node_base += 1 + len(tree.segments)
    return out


@pytest.fixture
def row_map():
    return packed_row_map
