"""`arpo bench train-step --quick` on the CPU: the scripted rollout builds exactly the trees the shape asks for,
and each provider's whole step runs and reports its split."""
from dataclasses import replace

from arpo.bench import train_step
from arpo.engine import LLMEngine


def test_scripted_rollout_has_the_requested_shape():
    case = replace(train_step.cases("cpu", quick=True)[0], prompts=2, leaves=5, initial=2, prompt=12, response=40,
                   tool_calls=2, result_len=4, tool_latency_ms=1.0)
    model = train_step._model(case)
    engine = LLMEngine(model, block_size=16, num_blocks=256, max_model_len=128, enable_prefix_caching=False)
    trees, times = train_step.scripted_tree_rollout(engine, case)
    assert set(times) == {"rollout", "tools"}
    assert len(trees) == 2
    for tree in trees:
        tree.validate()
        assert len(tree.prompt_ids) == 12 and len(tree.leaves) == 5
        for leaf in tree.leaves:
            path = [tree.segments[s] for s in tree.path(leaf)]
            assert len(path) == 3  # two tool results, three sampled runs
            assert sum(len(s) for s in path) == 3 * case.segment + 2 * 4
            assert [sum(1 - m for m in s.loss_mask) for s in path] == [4, 4, 0]  # results are never trained on
    assert not engine.seqs  # every sequence released


def test_quick_step_runs_every_provider():
    case = replace(train_step.cases("cpu", quick=True)[0], prompts=1, leaves=3, initial=2, prompt=8, response=24,
                   result_len=4, tool_latency_ms=1.0)
    for name, make in train_step.providers("cpu").items():
        step = make(case)
        assert step() is None
        extra = step.extra
        assert extra["leaves"] == 3 and extra["mfu"] is None  # no peak FLOPs known for a CPU
        assert all(extra[k] >= 0 for k in ("rollout_ms", "tools_ms", "packing_ms", "fwd_bwd_ms", "optimizer_ms"))
        tokens = 8 + 3 * case.segment + 8
        assert extra["trained_tokens"] == (3 * tokens if name == "duplicated-rows" else extra["unique_tree_tokens"])
