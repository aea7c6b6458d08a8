"""The fleet supervisor's bookkeeping (fleet/supervisor.py), without starting a fleet."""

from __future__ import annotations


def test_supervisor_removes_a_dead_workers_in_flight_share_only(tmp_path, monkeypatch):
    from fleet.supervisor import forget_metrics

    for name in ("gauge_livesum_4242.db", "gauge_livemostrecent_4242.db", "counter_4242.db", "gauge_livesum_4343.db"):
        (tmp_path / name).write_bytes(b"")
    forget_metrics(4242)  # no PROMETHEUS_MULTIPROC_DIR: nothing to do
    assert len(list(tmp_path.iterdir())) == 4
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    forget_metrics(4242)
    # its live gauges leave the sum; its counters stay (past requests happened); other workers untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db", "gauge_livesum_4343.db"]
