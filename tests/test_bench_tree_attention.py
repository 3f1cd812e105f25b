"""`arpo bench tree-attention` on the CPU: each provider runs forward + backward on a tiny tree; the interval
kernel runs only where it can (CUDA, or the Triton interpreter)."""
from dataclasses import replace

from arpo.algo.synthetic import arpo_tree
from arpo.bench import tree_attention


def _tiny():
    tree = arpo_tree(0, vocab=50, prompt_len=8, n_leaves=3, n_global=2, depth=2, seg_len=5, result_len=2)
    return replace(tree_attention.cases("cpu", quick=True)[0], name="tiny", trees=[tree], heads=2, kv_heads=1,
                   head_dim=16)


def test_every_provider_runs_on_a_tiny_tree():
    case = _tiny()  # the tests run under TRITON_INTERPRET=1 (conftest), so the kernel provider runs too
    assert case.extra()["tokens"] == case.trees[0].num_unique_tokens()
    for name, make in tree_attention.providers("cpu").items():
        run = make(case)
        assert run is not None, name
        assert run() is None


def test_kernel_provider_is_skipped_on_a_plain_cpu(monkeypatch):
    import arpo_kernels._backend as backend

    monkeypatch.setattr(backend, "interpreting", lambda: False)
    assert tree_attention.providers("cpu")["tree-kernel"](_tiny()) is None
