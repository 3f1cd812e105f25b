"""RolloutTree: building, paths, token counts, JSON round trip, rendering, validation."""
import json

import pytest

from arpo.algo.synthetic import arpo_tree, random_tree
from arpo.rollout.tree import ROOT, Leaf, RolloutTree, Segment


def small_tree() -> RolloutTree:
    #  prompt [1 2 3] ─ s0 [10 11 | 12 13 (tool result)] ─┬─ s1 [20 21] → leaf 0
    #                                                      └─ s2 [30]    → leaf 1
    #                 └ s3 [40 41 42] → leaf 2
    t = RolloutTree(prompt_ids=[1, 2, 3], prompt="p", answer="a", data_source="unit")
    s0 = t.add_segment(ROOT, [10, 11], [-0.1, -0.2], [1.0, 2.0])
    s0.extend([12, 13], mask=0)
    s1 = t.add_segment(s0.id, [20, 21], [-0.3, -0.4], [0.5, 0.6])
    s2 = t.add_segment(s0.id)
    s2.append(30, -0.5, 0.7)
    s3 = t.add_segment(ROOT, [40, 41, 42], loss_mask=[1, 0, 1])
    t.add_leaf(s1.id, reward=1.0, text="one", tool_calls=1, finish_reason="stop")
    t.add_leaf(s2.id, reward=0.0, tool_calls=1, finish_reason="length", metadata={"k": [1, 2]})
    t.add_leaf(s3.id, reward=0.5)
    return t


def test_paths_tokens_and_counts():
    t = small_tree()
    assert [t.path(j) for j in range(3)] == [[0, 1], [0, 2], [3]]
    assert t.path(t.leaves[1]) == [0, 2]
    assert t.leaf_token_ids(0) == [10, 11, 12, 13, 20, 21]
    assert t.leaf_token_ids(1, with_prompt=True) == [1, 2, 3, 10, 11, 12, 13, 30]
    assert t.leaf_values(0, "loss_mask") == [1, 1, 0, 0, 1, 1]
    assert t.leaf_values(1, "logprobs") == [-0.1, -0.2, 0.0, 0.0, -0.5]
    assert t.children(ROOT) == [0, 3] and t.children(0) == [1, 2] and t.children(1) == []
    assert t.depth_offset(0) == 3 and t.depth_offset(1) == 7 and t.depth_offset(3) == 3
    assert t.num_unique_tokens() == 3 + 4 + 2 + 1 + 3
    assert t.num_unique_tokens(with_prompt=False) == 10
    assert t.num_leaf_tokens() == sum(len(t.leaf_token_ids(j, with_prompt=True)) for j in range(3)) == 9 + 8 + 6
    assert t.rewards() == [1.0, 0.0, 0.5]


@pytest.mark.parametrize("seed", range(5))
def test_leaf_tokens_follow_parent_links(seed):
    t = random_tree(seed, n_leaves=6)
    for leaf in t.leaves:
        path = t.path(leaf)
        assert path[-1] == leaf.segment and t.segments[path[0]].parent == ROOT
        assert all(t.segments[b].parent == a for a, b in zip(path, path[1:]))
        assert len(t.leaf_token_ids(leaf)) == sum(len(t.segments[s]) for s in path)


@pytest.mark.parametrize("make", [small_tree, lambda: random_tree(7), lambda: arpo_tree(1, prompt_len=8, seg_len=4)])
def test_json_round_trip(make):
    t = make()
    text = t.to_json()
    back = RolloutTree.from_json(text)
    assert back == t
    assert RolloutTree.from_dict(json.loads(text)).to_dict() == t.to_dict()
    assert isinstance(back.segments[0], Segment) and isinstance(back.leaves[0], Leaf)


def test_render_shows_structure_and_masks():
    t = small_tree()
    text = t.render(decode=lambda ids: "".join(chr(96 + i % 26) for i in ids))
    lines = text.splitlines()
    assert lines[0].startswith("prompt (3 tok)")
    assert any(l.startswith("  #0 (4 tok)") and "[[" in l for l in lines)  # tool result shown masked
    assert any(l.startswith("    #1 (2 tok) -> leaf 0 r=1") for l in lines)  # child indented under its parent
    assert "3 leaves, 13 unique tokens, 23 as separate rows" in text
    assert "20 21" in t.render()  # token ids without a decoder


def test_bad_building_raises():
    t = small_tree()
    with pytest.raises(ValueError, match="parent 9"):
        t.add_segment(9, [1])
    with pytest.raises(ValueError, match="segment 9 does not exist"):
        t.add_leaf(9)
    with pytest.raises(ValueError, match="2 logprobs"):
        t.segments[0].extend([1, 2, 3], logprobs=[0.0, 0.0])


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d["segments"][1].update(parent=3), "parents must come first"),
    (lambda d: d["segments"][0].update(logprobs=[0.0]), "4 tokens but 1 logprobs"),
    (lambda d: d["segments"][0].update(loss_mask=[1, 2, 0, 0]), "0 or 1"),
    (lambda d: d["leaves"][0].update(segment=17), "does not exist"),
    (lambda d: d.update(prompt_ids=[]), "empty prompt"),
    (lambda d: d["segments"][2].update(id=5), "has id 5"),
])
def test_from_dict_validates(corrupt, message):
    d = small_tree().to_dict()
    corrupt(d)
    with pytest.raises(ValueError, match=message):
        RolloutTree.from_dict(d)
