"""QuantumMonitor over drifting emulated QPUs (real Target, real SQLite), and the calibration report."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from ray_qalloc.backends.aer import AerBackend
from ray_qalloc.backends.fake_qpu import FakeQPUBackend
from ray_qalloc.exceptions import UnknownBackend
from ray_qalloc.monitor import CalibrationSeries, Defect, DriftSettings, QuantumMonitor, Retention, SeriesKey
from ray_qalloc.monitor.cli import calibration_report, default_series_url, report_data

P = 900.0


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Flaky:
    """A QPU whose provider stops answering: calibration() raises once ``broken`` is set."""

    def __init__(self, inner: FakeQPUBackend) -> None:
        self.inner = inner
        self.broken = False

    def spec(self):
        return self.inner.spec()

    def calibration(self):
        if self.broken:
            raise ConnectionError("provider unreachable")
        return self.inner.calibration()


DEFECT = Defect(element=(2,), start_s=10 * P + 60.0, duration_s=5 * P, factor=8.0)


@pytest.fixture
def clock() -> Clock:
    return Clock(0.0)


@pytest.fixture
def series(tmp_path) -> CalibrationSeries:
    s = CalibrationSeries(default_series_url(tmp_path))
    yield s
    s.close()


def manila(clock: Clock, *defects: Defect, name: str = "qpu_manila", seed: int = 1) -> FakeQPUBackend:
    return FakeQPUBackend("fake_manila_v2", name=name, drift=DriftSettings(
        seed=seed, qubit_defect_rate_per_day=0.0, coupler_defect_rate_per_day=0.0, defects=defects,
        origin_s=0.0), clock=clock)


def drive(monitor: QuantumMonitor, clock: Clock, start: int, stop: int) -> list:
    events = []
    for i in range(start, stop):
        clock.t = i * P
        events += monitor.tick()
    return events


def test_monitor_records_detects_and_recovers(clock: Clock, series: CalibrationSeries) -> None:
    qpu = manila(clock, DEFECT)
    other = manila(clock, name="qpu_other", seed=2)
    monitor = QuantumMonitor([qpu, other, AerBackend("statevector")], series, period_s=P, clock=clock)
    assert monitor.devices() == ["qpu_manila", "qpu_other"]          # the simulator is not watched
    events = drive(monitor, clock, 0, 24)
    t1 = SeriesKey("t1", (2,))
    mine = [(e.key, e.kind, e.at) for e in events if e.key == t1]
    assert mine[0] == (t1, "drop", 11 * P)                           # the first refresh after the start
    assert mine[1][1] == "recovered" and 16 * P <= mine[1][2] <= 18 * P
    assert all(e.device == "qpu_manila" for e in events)            # nothing on the healthy device
    assert monitor.events("qpu_manila") == [e for e in events if e.device == "qpu_manila"]
    assert len(series.snapshot_times("qpu_manila")) == 24
    current = monitor.current("qpu_manila")
    assert current.taken_at == 23 * P and current.values == series.latest("qpu_manila").values
    assert monitor.stale() == {}
    timing = monitor.timing("qpu_manila")
    assert timing.samples == len(current.values) and timing.cpu_s < 1.0


def test_ticks_follow_the_period_and_repeated_calibrations_are_not_stored(clock: Clock,
                                                                           series: CalibrationSeries) -> None:
    qpu = manila(clock)
    monitor = QuantumMonitor({"dev": qpu}, series, period_s=2 * P, clock=clock)
    for t in (0.0, 100.0, P, 2 * P, 2 * P + 1, 4 * P):
        clock.t = t
        monitor.tick(t)
    assert series.snapshot_times("dev") == [0.0, 2 * P, 4 * P]
    clock.t = 4 * P + 10
    monitor.refresh("dev")                       # forced, but the device published nothing new
    assert series.snapshot_times("dev") == [0.0, 2 * P, 4 * P]
    with pytest.raises(UnknownBackend, match="dev"):
        monitor.current("nope")


def test_a_silent_provider_goes_stale(clock: Clock, series: CalibrationSeries) -> None:
    flaky = Flaky(manila(clock))
    monitor = QuantumMonitor([flaky], series, period_s=P, clock=clock, max_stale_periods=2)
    drive(monitor, clock, 0, 5)
    assert monitor.stale() == {}
    flaky.broken = True
    drive(monitor, clock, 5, 8)
    assert "unreachable" in monitor.last_error("qpu_manila")
    stale = monitor.stale()
    assert list(stale) == ["qpu_manila"] and stale["qpu_manila"].periods == pytest.approx(3.0)
    flaky.broken = False
    drive(monitor, clock, 8, 9)
    assert monitor.stale() == {} and monitor.last_error("qpu_manila") is None


def test_a_restarted_monitor_keeps_its_baselines_and_alarms(clock: Clock, tmp_path) -> None:
    url = default_series_url(tmp_path)
    first = QuantumMonitor([manila(clock, DEFECT)], CalibrationSeries(url), period_s=P, clock=clock)
    drive(first, clock, 0, 13)                  # the defect is on and alarmed
    assert set(first.alarms("qpu_manila")) >= {SeriesKey("t1", (2,))}
    # a new process: new backend (same drift origin), new detector, the same database
    second = QuantumMonitor([manila(clock, DEFECT)], CalibrationSeries(url), period_s=P, clock=clock)
    assert second.current("qpu_manila").taken_at == 12 * P
    events = drive(second, clock, 13, 24)
    assert set(second.alarms("qpu_manila")) == set()
    assert [e.kind for e in events if e.key == SeriesKey("t1", (2,))] == ["recovered"]   # no second "drop"
    assert [e.kind for e in second.events("qpu_manila", since=0.0) if e.key == SeriesKey("t1", (2,))][:1] == ["drop"]


def test_retention_applies_while_monitoring(clock: Clock, tmp_path) -> None:
    series = CalibrationSeries(default_series_url(tmp_path),
                               retention=Retention(max_age_s=5 * P, max_samples=None, prune_every=1))
    monitor = QuantumMonitor([manila(clock)], series, period_s=P, clock=clock)
    drive(monitor, clock, 0, 12)
    assert series.snapshot_times("qpu_manila") == [i * P for i in range(6, 12)]


def test_refresh_cost_of_a_133_qubit_device(clock: Clock, series: CalibrationSeries) -> None:
    torino = FakeQPUBackend("fake_torino", drift=DriftSettings(seed=3), clock=clock)
    monitor = QuantumMonitor([torino], series, period_s=P, clock=clock)
    cpu = []
    for i in range(4):
        clock.t = i * P
        monitor.tick()
        cpu.append(monitor.timing("qpu_torino").cpu_s)
    assert monitor.timing("qpu_torino").samples > 700       # 133 qubits × 5 quantities + couplers
    print(f"CPU per refresh of fake_torino: {sorted(cpu)[len(cpu) // 2]:.3f} s (median of {len(cpu)})")
    assert sorted(cpu)[len(cpu) // 2] < 1.5


# ------------------------------------------------------------------------------ the report


def test_calibration_report_shows_values_trends_flags_and_staleness(clock: Clock,
                                                                      series: CalibrationSeries) -> None:
    monitor = QuantumMonitor([manila(clock, DEFECT)], series, period_s=P, clock=clock)
    drive(monitor, clock, 0, 13)
    console = Console(record=True, width=200)
    data = calibration_report("qpu_manila", series, None, console, now=13 * P, period_s=P)
    text = console.export_text()
    assert "qpu_manila" in text and "T1 µs" in text and "⚠" in text
    row2 = next(line for line in text.splitlines() if line.startswith("│     2"))
    assert "⚠" in row2 and "↓" in row2
    assert "q2 T1 dropped" in text and "stale" not in text.split("\n")[0].split("—")[1]
    assert data["qubits"][2]["t1"]["alarm"]["direction"] == "down"
    assert data["qubits"][0]["t1"]["alarm"] is None
    json.dumps(data)                                   # what `-o json` prints
    late = report_data("qpu_manila", series, now=20 * P, period_s=P)
    assert late["staleness"]["stale"] and late["staleness"]["periods"] == pytest.approx(8.0)
    live = report_data("qpu_manila", series, monitor.detector, now=13 * P, period_s=P)
    assert live["alarms"] == data["alarms"]           # replaying the series gives the live alarms
    with pytest.raises(UnknownBackend, match="qpu_manila"):
        report_data("qpu_nope", series)


def test_qalloc_calibration_command_reads_the_recorded_series(clock: Clock, series: CalibrationSeries,
                                                              tmp_path) -> None:
    from typer.testing import CliRunner

    from ray_qalloc.cli import app

    monitor = QuantumMonitor([manila(clock, DEFECT)], series, period_s=P, clock=clock)
    drive(monitor, clock, 0, 13)
    url = default_series_url(tmp_path)
    out = CliRunner().invoke(app, ["-o", "json", "calibration", "qpu_manila", "--series-url", url,
                                   "--period", str(P)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["qubits"][2]["t1"]["alarm"]["direction"] == "down"
    missing = CliRunner().invoke(app, ["calibration", "qpu_nope", "--series-url", url])
    assert missing.exit_code == 2 and "qpu_nope" in missing.output
