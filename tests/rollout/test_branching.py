"""The branching formulas of ARPO.md §2 / AEPO §6, checked against hand-computed values."""
import math

import pytest

from arpo.rollout.branching import (EntropyBrancher, branch_probability, derive_seed, dynamic_global_budget,
                                    entropy_rise, hashed_uniform, should_branch, window_entropy)
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


def test_window_entropy_sums_or_averages_the_first_k():
    assert window_entropy([1.0, 2.0, 3.0, 10.0], 3, "sum") == pytest.approx(6.0)
    assert window_entropy([1.0, 2.0, 3.0, 10.0], 3, "mean") == pytest.approx(2.0)
    assert window_entropy([4.0], 20, "sum") == 4.0 and window_entropy([4.0], 20, "mean") == 4.0  # a short window
    assert window_entropy([], 5, "sum") == 0.0 and window_entropy([], 5, "mean") == 0.0
    assert window_entropy([1.0, 2.0], 5) == 3.0  # sum is the default, as in the reference
    with pytest.raises(ValueError, match="expected one of"):
        window_entropy([1.0], 1, "max")


def test_dynamic_budget():
    for n, hr, ht in ((8, 1.0, 1.0), (8, 3.0, 0.5), (8, 0.2, 2.9), (4, 10.0, 0.0)):
        want = math.floor(n * (1 / (1 + math.exp(-0.5 * (hr - ht))))) + 1
        assert dynamic_global_budget(n, hr, ht, budget=16) == min(want, 16)
    assert dynamic_global_budget(8, 40.0, 0.0, budget=5) == 5


def test_brancher_decide_matches_formulas():
    sampled = [0.5, 1.0, 1.5, 2.0, 9.0]          # H_init uses the first k=4
    probe = [3.0, 2.0, 1.0, 0.0, 100.0]          # H_t uses the first k=4
    b = EntropyBrancher(alpha=0.4, beta=0.3, tau=0.45, rule="threshold", k=4, vocab_size=54, reduce="mean")
    d = b.decide(sampled, probe, key=(0, 0), trajectory="g0", call=1, position=17)
    assert d.h_init == pytest.approx(1.25) and d.h_t == pytest.approx(1.5)
    assert d.delta_h == pytest.approx(0.25 / math.log(54))
    assert d.p == pytest.approx(0.4 + 0.3 * 0.25 / math.log(54)) and d.branch == (d.p > 0.45) and d.u is None
    draws = []
    fake = lambda *key: draws.append(key) or 0.42  # noqa: E731 - the pluggable RNG sees the full key
    b = EntropyBrancher(alpha=0.4, beta=0.3, rule="bernoulli", k=4, vocab_size=54, uniform=fake, reduce="mean")
    d = b.decide(sampled, probe, key=(7, 3), trajectory="g2.1.0", call=2, position=5)
    assert draws == [(7, 3, "g2.1.0", 2)] and d.u == 0.42 and d.branch == (0.42 < d.p)
    # sum (the default): H_init = 0.5 + 1 + 1.5 + 2 = 5, H_t = 3 + 2 + 1 + 0 = 6, so dH is k = 4 times the mean's
    d = EntropyBrancher(alpha=0.4, beta=0.3, tau=0.45, k=4, vocab_size=54).decide(
        sampled, probe, key=(0, 0), trajectory="g0", call=1, position=17)
    assert d.h_init == pytest.approx(5.0) and d.h_t == pytest.approx(6.0)
    assert d.delta_h == pytest.approx(1.0 / math.log(54)) and d.p == pytest.approx(0.4 + 0.3 / math.log(54))
    with pytest.raises(ValueError, match="entropy reduction"):
        EntropyBrancher(k=4, vocab_size=54, reduce="median")


def test_sum_gives_the_reference_scale_of_the_branch_probability():
    """The reference's k = 20 and Qwen2.5's vocabulary: each probe token 1 nat above its initial counterpart moves
    P by 0.2 * 20 / log|V| = 0.34 summed, but only by 0.2 / log|V| = 0.017 averaged — the issue-19 scale bug."""
    vocab = 151_936
    init, probe = [0.5] * 20, [1.5] * 20
    p = {r: EntropyBrancher(alpha=0.5, beta=0.2, k=20, vocab_size=vocab, reduce=r, rule="bernoulli",
                            uniform=lambda *key: 0.6).decide(init, probe, key=(0,), trajectory="g0", call=1,
                                                             position=0)
         for r in ("sum", "mean")}
    assert p["sum"].delta_h == pytest.approx(20 / math.log(vocab))
    assert p["sum"].p == pytest.approx(0.5 + 4 / math.log(vocab))
    assert p["mean"].delta_h == pytest.approx(1 / math.log(vocab))
    assert p["mean"].p == pytest.approx(0.5 + 0.2 / math.log(vocab))
    assert p["sum"].branch and not p["mean"].branch  # u = 0.6: 0.6 < 0.835 but not < 0.517


def test_hashed_draws_are_stable_and_spread():
    assert hashed_uniform(1, "a") == hashed_uniform(1, "a") != hashed_uniform(1, "b")
    us = [hashed_uniform(0, i) for i in range(2000)]
    assert all(0 <= u < 1 for u in us) and abs(sum(us) / len(us) - 0.5) < 0.03
    assert derive_seed(3, "g1") == derive_seed(3, "g1") and 0 <= derive_seed(3, "g1") < 2**63


@pytest.mark.parametrize("bad, match", [
    (dict(mode="beam"), "mode"), (dict(branch_rule="coin"), "branch_rule"), (dict(initial=20), "initial"),
    (dict(leaves=0), "leaves"), (dict(prefix_mode="copy"), "prefix_mode"), (dict(top_p=0.0), "top_p"),
    (dict(max_tool_calls=-1), "max_tool_calls"), (dict(temperature=-1.0), "temperature"),
    (dict(entropy_reduce="max"), "entropy_reduce"), (dict(over_limit="stop"), "over_limit"),
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
    assert (cfg.entropy_reduce, cfg.over_limit) == ("mean", "text")  # the embedded preset's, as measured
    assert (RolloutConfig().entropy_reduce, RolloutConfig().over_limit) == ("sum", "end")  # the reference's
    cfg = rollout_config(load_config(None, ["rollout.entropy_reduce=sum", "rollout.over_limit=end"]))
    assert (cfg.entropy_reduce, cfg.over_limit) == ("sum", "end")
