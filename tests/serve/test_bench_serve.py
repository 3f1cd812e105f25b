"""`arpo bench serve`'s bookkeeping: percentiles, and the summary refuses a pass that lost tokens."""
import pytest

from arpo.bench import serve as B


def test_percentiles_interpolate_between_order_statistics():
    values = [float(v) for v in range(1, 101)]       # 1..100
    assert B.percentile(values, 50) == pytest.approx(50.5)
    assert B.percentile(values, 99) == pytest.approx(99.01)
    assert B.percentile([7.0], 99) == 7.0


def test_summary_pools_the_passes_and_checks_the_token_count():
    case = B.Case(2, 2, 3, "cpu")
    per = [{"start": 0.0, "stamps": [0.010, 0.012, 0.014]}, {"start": 0.0, "stamps": [0.020, 0.021, 0.022]}]
    slow = [{"start": 0.0, "stamps": [0.030, 0.034, 0.038]}, {"start": 0.0, "stamps": [0.040, 0.044, 0.048]}]
    passes = [{"wall": 0.5, "per_request": per}, {"wall": 2.0, "per_request": slow},
              {"wall": 0.25, "per_request": per}]
    s = B.summarise(passes, case)
    assert s["passes"] == 3
    assert s["requests_per_s"] == pytest.approx(4.0) and s["tokens_per_s"] == pytest.approx(12.0)  # median wall
    assert s["ttft_p50_ms"] == pytest.approx(20.0)     # of 10, 10, 20, 20, 30, 40 ms
    assert s["itl_p50_ms"] == pytest.approx(2.0)       # gaps 2, 2, 1, 1 (x2) and 4, 4, 4, 4
    assert s["itl_p99_ms"] == pytest.approx(4.0)
    offline = B.summarise([{"wall": 0.5, "tokens": 6}], case)
    assert offline["tokens_per_s"] == pytest.approx(12.0) and "itl_p50_ms" not in offline
    with pytest.raises(RuntimeError, match="pass 2 streamed 5 tokens, expected 6"):
        B.summarise([passes[0], {"wall": 0.5, "per_request": [per[0], {"start": 0.0, "stamps": [0.1, 0.2]}]}], case)


def test_passes_records_every_call_and_summarises_after():
    case = B.Case(1, 1, 2, "cpu")
    walls = iter([0.1, 0.3, 0.2])
    fn = B.Passes(lambda: {"wall": next(walls), "tokens": 2}, case)
    assert fn.extra == {}
    for _ in range(3):
        fn()
    assert fn.extra["passes"] == 3 and fn.extra["tokens_per_s"] == pytest.approx(2 / 0.2)
