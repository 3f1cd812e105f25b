"""`arpo bench serve`'s bookkeeping: percentiles, and the summary refuses a pass that lost tokens."""
import pytest

from arpo.bench import serve as B


def test_percentiles_interpolate_between_order_statistics():
    values = [float(v) for v in range(1, 101)]       # 1..100
    assert B.percentile(values, 50) == pytest.approx(50.5)
    assert B.percentile(values, 99) == pytest.approx(99.01)
    assert B.percentile([7.0], 99) == 7.0


def test_summary_measures_ttft_and_gaps_and_checks_the_token_count():
    case = B.Case(2, 2, 3, "cpu")
    per = [{"start": 0.0, "stamps": [0.010, 0.012, 0.014]}, {"start": 0.0, "stamps": [0.020, 0.021, 0.022]}]
    s = B._summarise({"wall": 0.5, "per_request": per}, case)
    assert s["requests_per_s"] == pytest.approx(4.0) and s["tokens_per_s"] == pytest.approx(12.0)
    assert s["ttft_p50_ms"] == pytest.approx(15.0)
    assert s["itl_p50_ms"] == pytest.approx(1.5)
    with pytest.raises(RuntimeError, match="streamed 5 tokens, expected 6"):
        B._summarise({"wall": 0.5, "per_request": [per[0], {"start": 0.0, "stamps": [0.1, 0.2]}]}, case)
