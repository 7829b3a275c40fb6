"""The event-loop lag measure behind /kvman/status's loop_lag_ms."""

from pbkv.metrics import LoopLag


def test_recent_max_forgets_old_delays_but_worst_keeps_them():
    lag = LoopLag(window=10.0)
    lag.record(0.0, 0.002)
    lag.record(0.5, 0.150)  # one slow turn
    lag.record(2.0, 0.001)
    assert lag.recent_max(2.0) == 0.150
    assert lag.worst == 0.150
    for t in range(3, 15):
        lag.record(float(t), 0.003)
    assert lag.recent_max(14.0) == 0.003
    assert lag.worst == 0.150


def test_no_samples_means_no_lag():
    assert LoopLag().recent_max(100.0) == 0
