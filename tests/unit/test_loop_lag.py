"""The event-loop lag measure behind /kvman/status's loop_lag_ms."""

import pytest

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


def test_the_probe_records_how_late_it_fired():
    lag = LoopLag(window=10.0, interval=0.02)
    lag.fired(100.0)  # the first run only sets when the next is due
    assert lag.worst == 0
    lag.fired(100.02)  # on time
    assert lag.fired(100.29) == pytest.approx(0.25)  # due at 100.04: busy for 0.25 s
    lag.fired(100.30)  # early by a timer's rounding: no negative lag
    assert lag.recent_max(100.30) == pytest.approx(0.25)
    assert lag.worst == pytest.approx(0.25)
    assert lag.recent_max(111.0) == 0  # past the window


def test_gc_pauses_are_recorded_per_generation() -> None:
    import gc

    from pbkv.metrics import GcPauses

    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert pauses.longest[2] > 0.0
    assert pauses._callback not in gc.callbacks
    before = list(pauses.longest)
    gc.collect(2)  # uninstalled: no longer recorded
    assert pauses.longest == before
