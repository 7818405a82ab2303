"""Drift detectors, monitor and reactions, without Ray (seeded, fast)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from livetrain.config import ConfigError
from livetrain.training.drift import (
    DriftAlarm,
    DriftConfig,
    DriftMonitor,
    ErrorDriftDetector,
    FeatureDriftDetector,
    ReactionState,
    decay,
    react,
)

DETECTORS = ["adwin", "page_hinkley"]


def errors(rng: np.random.Generator, rate: float, rows: int) -> np.ndarray:
    return (rng.random(rows) < rate).astype(np.int64)


def feed(det: ErrorDriftDetector, e: np.ndarray, block: int) -> int | None:
    """Feed ``e`` in blocks; rows fed up to the end of the first alarming block."""
    for lo in range(0, len(e), block):
        if det.update(e[lo : lo + block]):
            return min(lo + block, len(e))
    return None


# --- error stream ----------------------------------------------------------------


@pytest.mark.parametrize("kind", DETECTORS)
def test_stationary_error_stream_raises_no_alarm(kind):
    det = ErrorDriftDetector(DriftConfig(error_detector=kind))
    assert feed(det, errors(np.random.default_rng(0), 0.05, 20_000), block=1000) is None


@pytest.mark.parametrize("kind", DETECTORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_rate_jump_from_5_to_30_percent_alarms_within_500_rows(kind, seed):
    # Measured over 20 seeds, fed row by row: ADWIN 32-128 rows (it checks
    # every 32 rows), Page-Hinkley 146-241 rows. In 100-row blocks the block
    # boundary adds up to 99.
    rng = np.random.default_rng(seed)
    det = ErrorDriftDetector(DriftConfig(error_detector=kind))
    assert feed(det, errors(rng, 0.05, 20_000), block=1000) is None
    delay = feed(det, errors(rng, 0.30, 5_000), block=100)
    assert delay is not None and delay <= 500
    d = det.last_detail
    assert d["error_rate_before"] == pytest.approx(0.05, abs=0.01)
    assert d["error_rate_after"] > d["error_rate_before"]


def test_falling_error_rate_alarms_only_when_asked():
    rng = np.random.default_rng(3)
    stream = np.concatenate([errors(rng, 0.30, 10_000), errors(rng, 0.05, 5_000)])
    assert feed(ErrorDriftDetector(DriftConfig()), stream, block=500) is None
    assert feed(ErrorDriftDetector(DriftConfig(alarm_on_error_decrease=True)), stream, block=500) is not None


@pytest.mark.parametrize("kind", DETECTORS)
def test_error_detector_keeps_up_with_the_stream(kind):
    det = ErrorDriftDetector(DriftConfig(error_detector=kind))
    e = errors(np.random.default_rng(4), 0.05, 50_000)
    t = time.perf_counter()
    feed(det, e, block=1000)
    rate = len(e) / (time.perf_counter() - t)
    assert rate > 10_000  # measured 1.3 M (Page-Hinkley) to 4.8 M (ADWIN) rows/s


# --- features --------------------------------------------------------------------


def normal_blocks(rng: np.random.Generator, blocks: int, rows: int = 1000, d: int = 5) -> list[np.ndarray]:
    return [rng.standard_normal((rows, d)) for _ in range(blocks)]


def test_psi_flags_exactly_the_shifted_feature():
    rng = np.random.default_rng(0)
    det = FeatureDriftDetector(DriftConfig())
    for x in normal_blocks(rng, 5):
        assert det.update(x) == []
    shifted = rng.standard_normal((1000, 5))
    shifted[:, 3] += 1.0
    assert det.update(shifted) == [3]
    assert det.last_psi is not None and det.last_psi[3] > 0.2
    assert np.all(np.delete(det.last_psi, 3) < 0.1)


def test_a_large_block_is_compared_on_rows_strided_over_all_of_it(monkeypatch):
    import livetrain.training.drift as drift_module

    rng = np.random.default_rng(4)
    det = FeatureDriftDetector(DriftConfig())
    for x in normal_blocks(rng, 5):
        det.update(x)
    rows = 4 * drift_module.PSI_MAX_ROWS
    calm = rng.standard_normal((rows, 5)).astype(np.float32)
    late = rng.standard_normal((rows, 5)).astype(np.float32)
    late[-rows // 4 :, 1] += 3.0  # only the block's last quarter moved
    sampled = [det.psi(calm), det.psi(late)]
    monkeypatch.setattr(drift_module, "PSI_MAX_ROWS", 10**9)  # every row
    full = [det.psi(calm), det.psi(late)]
    for a, b in zip(sampled, full):
        assert np.abs(a - b).max() < 0.02
    assert sampled[1][1] > 0.2 and np.all(np.delete(sampled[1], 1) < 0.05)
    assert det.update(late) == [1]


@pytest.mark.parametrize("values", ["continuous", "few distinct"])
def test_bins_and_edges_are_the_plain_definitions(values):
    """The binary-search binning and the quantiles of sorted columns give what
    comparing every row with every edge and ``np.quantile`` give, ties on the
    edges included (a value equal to an edge is not above it)."""
    rng = np.random.default_rng(5)
    make = (lambda n: rng.standard_normal((n, 4))) if values == "continuous" else (lambda n: rng.integers(0, 4, (n, 4)).astype(float))
    det = FeatureDriftDetector(DriftConfig(min_rows=500, reference_rows=1500))
    blocks = [make(500) for _ in range(4)]
    for x in blocks:
        det.update(x)
    ref = np.concatenate(blocks[:3])  # the fourth was compared, and joined nothing: the reference was full
    edges = np.quantile(ref, np.linspace(0, 1, 11)[1:-1], axis=0)
    assert np.array_equal(det._edges, edges)

    def plain(x):
        idx = (x[:, None, :] > edges[None, :, :]).sum(axis=1)
        return np.maximum(np.stack([(idx == b).mean(axis=0) for b in range(10)]), 1e-4)

    assert np.array_equal(det._ref_frac, plain(ref))
    chunk = make(700)
    assert np.allclose(det._bin_fractions(chunk), plain(chunk), rtol=0, atol=1e-12)


def test_same_distribution_blocks_raise_no_feature_alarm():
    rng = np.random.default_rng(1)
    det = FeatureDriftDetector(DriftConfig())
    assert all(det.update(x) == [] for x in normal_blocks(rng, 40))


def test_small_blocks_are_pooled_until_min_rows():
    rng = np.random.default_rng(2)
    det = FeatureDriftDetector(DriftConfig(min_rows=500))
    for x in normal_blocks(rng, 5):
        det.update(x)
    shifted = [b + np.array([0, 0, 2.0, 0, 0]) for b in normal_blocks(rng, 5, rows=100)]
    assert [det.update(b) for b in shifted] == [[], [], [], [], [2]]


def test_new_regime_becomes_the_reference_after_an_alarm():
    rng = np.random.default_rng(3)
    det = FeatureDriftDetector(DriftConfig(reference_rows=2000, min_rows=500))
    for x in normal_blocks(rng, 3):
        det.update(x)
    new = [b + 1.5 for b in normal_blocks(rng, 10)]
    assert det.update(new[0]) == [0, 1, 2, 3, 4]
    assert det.reference_rows == 0
    assert all(det.update(b) == [] for b in new[1:])
    assert det.reference_rows == 2000


def test_feature_count_mismatch_is_an_error():
    det = FeatureDriftDetector(DriftConfig())
    det.update(np.zeros((1000, 5)))
    with pytest.raises(ValueError, match="features"):
        det.update(np.zeros((1000, 4)))


# --- monitor ---------------------------------------------------------------------


def rising_and_falling(rng: np.random.Generator, cycles: int) -> np.ndarray:
    return np.concatenate([np.concatenate([errors(rng, 0.05, 3000), errors(rng, 0.40, 3000)]) for _ in range(cycles)])


def run_monitor(cfg: DriftConfig, e: np.ndarray, block: int = 500) -> DriftMonitor:
    rng = np.random.default_rng(5)
    mon = DriftMonitor(cfg)
    for seq, lo in enumerate(range(0, len(e), block)):
        mon.observe(seq, rng.standard_normal((len(e[lo : lo + block]), 3)), e[lo : lo + block], now=1000.0 + seq)
    return mon


def test_each_error_rise_alarms_without_cooldown():
    mon = run_monitor(DriftConfig(cooldown_rows=0), rising_and_falling(np.random.default_rng(6), 4))
    assert [a.detector for a in mon.alarms] == ["error:adwin"] * 4
    assert mon.suppressed == 0


def test_cooldown_suppresses_repeated_alarms():
    mon = run_monitor(DriftConfig(cooldown_rows=100_000), rising_and_falling(np.random.default_rng(6), 4))
    assert [a.detector for a in mon.alarms] == ["error:adwin"]
    assert mon.suppressed == 3


def test_monitor_alarm_names_block_time_and_features():
    rng = np.random.default_rng(7)
    mon = DriftMonitor(DriftConfig())
    for seq in range(5):
        assert mon.observe(seq, rng.standard_normal((1000, 4)), None, now=float(seq)) == []
    x = rng.standard_normal((1000, 4))
    x[:, 1] *= 3.0
    (alarm,) = mon.observe(5, x, None, now=5.0)
    assert alarm == mon.alarms[-1]
    assert (alarm.detector, alarm.features, alarm.seq, alarm.at) == ("features:psi", [1], 5, 5.0)
    assert alarm.detail["psi_1"] > 0.2
    assert mon.stats()["drift_last_seq"] == 5


def test_alarm_history_is_bounded_but_counts_and_hands_out_every_alarm():
    full = run_monitor(DriftConfig(cooldown_rows=0), rising_and_falling(np.random.default_rng(6), 4))
    mon = run_monitor(DriftConfig(cooldown_rows=0, max_alarms=2), rising_and_falling(np.random.default_rng(6), 4))
    assert len(mon.alarms) == 2 and mon.stats()["drift_alarms"] == 4
    # a reader that has taken the first three gets the fourth, though two were dropped
    assert mon.alarms_since(3) == full.alarms[3:] and mon.alarms_since(4) == []


# --- reactions -------------------------------------------------------------------

ALARM = DriftAlarm(at=0.0, detector="error:adwin", features=[], detail={}, seq=1)


REACT = {"alarm_recent_fraction": 0.95, "alarm_lr_scale": 3.0, "alarm_window_rows_scale": 0.5}


def test_alarm_raises_recent_fraction_and_lr_and_shortens_window():
    cfg = DriftConfig(**REACT)
    s = react(ALARM, ReactionState.at_rest(0.7, 2000), cfg)
    assert (s.recent_fraction, s.lr_scale, s.window_rows_scale) == (0.95, 3.0, 0.5)
    assert s.base_recent_fraction == 0.7


def test_mix_and_lr_decay_back_to_baseline_over_recover_rows():
    cfg = DriftConfig(recover_rows=10_000, **REACT)
    s = react(ALARM, ReactionState.at_rest(0.7, 2000), cfg)
    half = decay(s, 5_000, cfg)
    assert half.recent_fraction == pytest.approx(0.825)
    assert half.lr_scale == pytest.approx(2.0)
    assert decay(half, 5_000, cfg) == ReactionState.at_rest(0.7, 2000)
    assert decay(s, 50_000, cfg).at_baseline


def test_the_shortened_window_regrows_by_each_row_that_arrives():
    """It holds the rows since the alarm, whatever ``recover_rows`` says: the
    new regime, all of it, until the configured window is full again."""
    cfg = DriftConfig(recover_rows=100_000, **REACT)  # alarm window: 0.5 x 2000 rows
    s = react(ALARM, ReactionState.at_rest(0.7, 2000), cfg)
    for rows_since_alarm in (500, 1000):
        assert 2000 * decay(s, rows_since_alarm, cfg).window_rows_scale == pytest.approx(1000 + rows_since_alarm)
    assert decay(decay(s, 600, cfg), 400, cfg).window_rows_scale == pytest.approx(1.0)
    assert decay(s, 1000, cfg).lr_scale > 2.9  # the others still on their slow way back


def test_a_second_alarm_never_weakens_the_reaction():
    cfg = DriftConfig(**REACT)
    s = react(ALARM, ReactionState.at_rest(0.7, 2000), cfg)
    assert react(ALARM, s, cfg) == s
    assert react(ALARM, ReactionState.at_rest(0.99, 2000), cfg).recent_fraction == 0.99


# --- config and purity -----------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("error_detector", "ddm"),
        ("adwin_delta", 0.0),
        ("ph_threshold", 0.0),
        ("psi_threshold", -0.1),
        ("psi_bins", 1),
        ("min_rows", 10_000),
        ("cooldown_rows", -1),
        ("alarm_recent_fraction", 1.5),
        ("alarm_lr_scale", 0.5),
        ("alarm_window_rows_scale", 0.0),
        ("recover_rows", 0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"drift\.{field}"):
        DriftConfig(**{field: value})


def test_drift_module_does_not_import_ray():
    tree = ast.parse(Path(__file__).parents[1].joinpath("training", "drift.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "ray"]
