"""The branching formulas of ARPO.md §2 / AEPO §6, checked against hand-computed values."""
import math

import pytest

from arpo.rollout.branching import (EntropyBrancher, branch_probability, derive_seed, dynamic_global_budget,
                                    entropy_rise, hashed_uniform, mean_entropy, should_branch)
from arpo.rollout.config import RolloutConfig


def test_entropy_rise_and_probability():
    assert entropy_rise(2.0, 1.0, 54) == pytest.approx(1.0 / math.log(54))
    assert entropy_rise(1.0, 2.0, 2) == pytest.approx(-1.0 / math.log(2))
    assert branch_probability(0.5, 0.5, 0.2) == pytest.approx(0.6)
    assert branch_probability(-1.0, 0.5, 0.2) == pytest.approx(0.3)
    # AEPO penalty: P * max(0, 1 - rate * consecutive)
    assert branch_probability(0.5, 0.5, 0.2, consecutive=2, penalty_rate=0.05) == pytest.approx(0.6 * 0.9)
    assert branch_probability(0.5, 0.5, 0.2, consecutive=30, penalty_rate=0.05) == 0.0
    with pytest.raises(ValueError, match="vocab_size"):
        entropy_rise(1.0, 0.0, 1)


def test_rules():
    assert should_branch(0.51, "threshold", 0.5) and not should_branch(0.5, "threshold", 0.5)
    assert should_branch(0.3, "bernoulli", 0.9, u=0.29) and not should_branch(0.3, "bernoulli", 0.9, u=0.3)
    assert should_branch(1.7, "bernoulli", 0.5, u=0.999) and not should_branch(-0.2, "bernoulli", 0.5, u=0.0)
    with pytest.raises(ValueError, match="needs a uniform"):
        should_branch(0.5, "bernoulli", 0.5)
    with pytest.raises(ValueError, match="unknown branch rule"):
        should_branch(0.5, "coin", 0.5)


def test_mean_entropy_and_dynamic_budget():
    assert mean_entropy([1.0, 2.0, 3.0, 10.0], 3) == pytest.approx(2.0)
    assert mean_entropy([4.0], 20) == 4.0 and mean_entropy([], 5) == 0.0
    for n, hr, ht in ((8, 1.0, 1.0), (8, 3.0, 0.5), (8, 0.2, 2.9), (4, 10.0, 0.0)):
        want = math.floor(n * (1 / (1 + math.exp(-0.5 * (hr - ht))))) + 1
        assert dynamic_global_budget(n, hr, ht, budget=16) == min(want, 16)
    assert dynamic_global_budget(8, 40.0, 0.0, budget=5) == 5


def test_brancher_decide_matches_formulas():
    sampled = [0.5, 1.0, 1.5, 2.0, 9.0]          # H_init uses the first k=4
    probe = [3.0, 2.0, 1.0, 0.0, 100.0]          # H_t uses the first k=4
    b = EntropyBrancher(alpha=0.4, beta=0.3, tau=0.45, rule="threshold", k=4, vocab_size=54)
    d = b.decide(sampled, probe, key=(0, 0), trajectory="g0", call=1, position=17)
    assert d.h_init == pytest.approx(1.25) and d.h_t == pytest.approx(1.5)
    assert d.delta_h == pytest.approx(0.25 / math.log(54))
    assert d.p == pytest.approx(0.4 + 0.3 * 0.25 / math.log(54)) and d.branch == (d.p > 0.45) and d.u is None
    draws = []
    fake = lambda *key: draws.append(key) or 0.42  # noqa: E731 - the pluggable RNG sees the full key
    b = EntropyBrancher(alpha=0.4, beta=0.3, rule="bernoulli", k=4, vocab_size=54, uniform=fake)
    d = b.decide(sampled, probe, key=(7, 3), trajectory="g2.1.0", call=2, position=5)
    assert draws == [(7, 3, "g2.1.0", 2)] and d.u == 0.42 and d.branch == (0.42 < d.p)


def test_hashed_draws_are_stable_and_spread():
    assert hashed_uniform(1, "a") == hashed_uniform(1, "a") != hashed_uniform(1, "b")
    us = [hashed_uniform(0, i) for i in range(2000)]
    assert all(0 <= u < 1 for u in us) and abs(sum(us) / len(us) - 0.5) < 0.03
    assert derive_seed(3, "g1") == derive_seed(3, "g1") and 0 <= derive_seed(3, "g1") < 2**63


@pytest.mark.parametrize("bad, match", [
    (dict(mode="beam"), "mode"), (dict(branch_rule="coin"), "branch_rule"), (dict(initial=20), "initial"),
    (dict(leaves=0), "leaves"), (dict(prefix_mode="copy"), "prefix_mode"), (dict(top_p=0.0), "top_p"),
    (dict(max_tool_calls=-1), "max_tool_calls"), (dict(temperature=-1.0), "temperature"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**bad)


def test_the_run_config_composes_the_rollout_settings():
    """One declaration: the run's `rollout` section is a RolloutConfig, and the builder hands it on resolved."""
    from arpo.build import rollout_config
    from arpo.config import load_config

    run = load_config(None, ["rollout.leaves=4", "rollout.initial=2", "rollout.branch_rule=bernoulli"])
    assert isinstance(run.rollout, RolloutConfig)
    cfg = rollout_config(run)
    assert cfg.mode == "tree" and run.rollout.mode == "auto"
    assert (cfg.leaves, cfg.initial, cfg.branch_rule, cfg.alpha, cfg.probe_tokens) == (4, 2, "bernoulli", 0.5, 4)
