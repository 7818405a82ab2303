"""Registry logic without Ray: test-then-train, gating on unseen rows, freshness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livetrain.config import GateConfig
from livetrain.messages import BlockMeta, Candidate
from livetrain.training.models import MLP, model_spec
from livetrain.config import ModelConfig
from livetrain.training.registry import Registry

SPEC = model_spec(ModelConfig(hidden=[4]), num_features=2, num_classes=2)


def weights_predicting(cls: int) -> dict[str, np.ndarray]:
    """Weights of an MLP that always predicts ``cls``."""
    torch.manual_seed(0)
    m = MLP(2, 2, [4])
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.net[-1].bias[cls] = 1.0
    return {k: v.numpy().copy() for k, v in m.state_dict().items()}


def block(seq: int, label: int, rows: int = 100, written_at: float = 0.0):
    meta = BlockMeta(f"s{seq}", seq, rows, rows * 12, written_at, written_at)
    return meta, np.zeros((rows, 2), np.float32), np.full(rows, label, np.int64)


def cand(cls: int, through: int, written_at: float = 0.0) -> tuple[Candidate, dict]:
    w = weights_predicting(cls)
    return Candidate(None, SPEC, through, written_at, 0, 0.0, 0.0), w


def registry(**kw) -> Registry:
    """Judged on newer shards only unless a test names ``holdout_fraction``."""
    kw = {"holdout_fraction": 0.0, **kw}
    kw.setdefault("rollback_min_rows", 1000)  # at most window_rows (GateConfig)
    return Registry(GateConfig(min_eval_rows=100, max_eval_rows=1000, window_rows=1000, **kw), 2, clock=lambda: 100.0)


def test_candidate_waits_for_rows_it_has_not_seen():
    r = registry()
    r.observe(*block(0, 1))
    _, decisions = r.propose(*cand(1, through=0))
    assert decisions == [] and r.served is None  # block 0 was trained on: no evidence
    decisions = r.observe(*block(1, 1))
    assert [d.action for d in decisions] == ["promote"] and r.served.version == 1


def test_rejected_candidate_is_never_served():
    r = registry()
    r.propose(*cand(1, through=-1))
    r.observe(*block(0, 1))
    assert r.served.version == 1
    v, _ = r.propose(*cand(0, through=0))  # predicts the wrong class
    decisions = r.observe(*block(1, 1))
    assert [d.action for d in decisions] == ["reject"]
    assert r.served.version == 1 and v == 2
    assert decisions[0].candidate["accuracy"] == 0.0 and decisions[0].served["accuracy"] == 1.0


def test_gate_compares_on_rows_newer_than_both_versions():
    r = registry()
    r.propose(*cand(1, through=-1))
    r.observe(*block(0, 1))
    r.observe(*block(1, 0))  # seq 1 says class 0
    r.propose(*cand(0, through=1))
    assert r.served.version == 1  # rows <= seq 1 do not count
    d = r.observe(*block(2, 0))
    assert d[0].action == "promote" and d[0].eval_rows == 100


def test_newer_candidate_supersedes_pending_one():
    r = registry()
    r.propose(*cand(1, through=5))
    _, d = r.propose(*cand(1, through=6))
    assert [x.action for x in d] == ["supersede"] and r.pending.version == 2


def test_a_candidate_with_non_finite_weights_is_rejected_and_the_pending_one_stays():
    r = registry()
    r.propose(*cand(1, through=-1))
    r.observe(*block(0, 1))
    r.propose(*cand(1, through=5))  # pending: no unseen rows yet
    c, w = cand(0, through=0)  # a diverged run: on class-0 rows NaN weights answer 0, so the gate would pass them
    v, decisions = r.propose(c, {k: np.full_like(a, np.nan) if a.dtype.kind == "f" else a for k, a in w.items()})
    assert [(d.version, d.action) for d in decisions] == [(v, "reject")] and "non-finite weights" in decisions[0].reason
    assert r.served.version == 1 and r.pending.version == 2 and r.stats()["versions_rejected"] == 1


def test_a_candidate_whose_weights_do_not_fit_its_spec_changes_nothing():
    from livetrain.training.checkpoint import CheckpointError

    r = registry()
    r.propose(*cand(1, through=5))
    c, w = cand(1, through=6)
    with pytest.raises(CheckpointError, match="do not fit"):
        r.propose(c, {**w, "net.1.weight": np.zeros((7, 7), np.float32)})
    assert r.pending.version == 1 and r.next_version == 2 and r.decisions == [] and r.versions_proposed == 1


def test_served_model_is_scored_before_training_prequentially():
    r = registry()
    r.propose(*cand(1, through=-1))
    r.observe(*block(0, 1))  # promotes v1 (not yet scored on this block)
    r.observe(*block(1, 1))
    r.observe(*block(2, 0))
    assert r.prequential.rows == 200 and r.prequential.accuracy == pytest.approx(0.5)


def test_freshness_is_closed_by_first_answer_of_a_version_trained_on_the_shard():
    r = registry()
    r.observe(*block(0, 1, written_at=10.0))
    r.observe(*block(1, 1, written_at=11.0))
    r.propose(*cand(1, through=0))
    r.observe(*block(2, 1, written_at=12.0))  # v1 promoted, trained through seq 0
    r.record_answer(1, at=13.0)
    assert r.freshness_s == [3.0]  # only shard 0 is covered by v1
    r.record_answer(1, at=20.0)  # not the first answer any more
    assert r.freshness_s == [3.0]


def weights_above(t: float) -> dict[str, np.ndarray]:
    """Weights of an MLP that predicts class 1 exactly where ``x0 > t`` (its
    input norm at rest, running mean 0 and variance 1, is the identity)."""
    m = MLP(2, 2, [4])
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.net[1].weight[0, 0], m.net[1].bias[0] = 1.0, -t  # h0 = x0 - t
        m.net[1].weight[1, 0], m.net[1].bias[1] = -1.0, t  # h1 = t - x0
        m.net[3].weight[1, 0], m.net[3].weight[1, 1] = 10.0, -10.0  # class 1 iff h0 > h1
    return {k: v.numpy().copy() for k, v in m.state_dict().items()}


def ramp(seq: int):
    """100 rows of class 1 with x0 = 0.005, 0.015, ...: ``weights_above(t)`` scores 1 - t."""
    x = np.zeros((100, 2), np.float32)
    x[:, 0] = (np.arange(100) + 0.5) / 100
    return BlockMeta(f"s{seq}", seq, 100, 1200, 0.0, 0.0), x, np.ones(100, np.int64)


def test_the_tolerance_is_not_spent_again_at_every_promotion():
    """Each candidate is one point below the one served (tolerance 1.5): the
    third is two points below the first on the same rows and stays out.
    Without ``compare_versions`` the endpoint walks down."""
    for compare, served in ((4, [1, 2, 2, 2]), (0, [1, 2, 3, 4])):
        r = registry(tolerance=0.015, compare_versions=compare)
        seen = []
        for k, t in enumerate((0.0, 0.01, 0.02, 0.03)):
            r.propose(Candidate(None, SPEC, k - 1, 0.0, 0, 0.0, 0.0), weights_above(t))
            decisions = r.observe(*ramp(k))
            seen.append(r.served.version)
        assert seen == served, compare
        assert decisions[0].candidate["accuracy"] == pytest.approx(0.97)
    r = registry(tolerance=0.015)
    for k, t in enumerate((0.0, 0.01, 0.02)):
        r.propose(Candidate(None, SPEC, k - 1, 0.0, 0, 0.0, 0.0), weights_above(t))
        decisions = r.observe(*ramp(k))
    assert decisions[0].action == "reject" and "v1, served before, has accuracy 1.0000" in decisions[0].reason


def test_a_candidate_within_the_tolerance_of_the_versions_served_before_is_promoted():
    """compare_versions holds back only a candidate more than the tolerance below an
    earlier version: 0.98 against v1's 1.00 is within 0.025."""
    r = registry(tolerance=0.025, compare_versions=4)
    for k, t in enumerate((0.0, 0.01, 0.02)):  # accuracy 1.00, 0.99, 0.98 on the ramp
        r.propose(Candidate(None, SPEC, k - 1, 0.0, 0, 0.0, 0.0), weights_above(t))
        (decision,) = r.observe(*ramp(k))
    assert decision.action == "promote", decision.reason
    assert r.served.version == 3 and decision.candidate["accuracy"] == pytest.approx(0.98)


def test_a_long_run_keeps_counts_but_only_the_newest_decisions_and_freshness(monkeypatch):
    """Months of decisions must not pile up in the registry's memory, nor make
    every ``stats`` call slower: counts are kept, the lists are trimmed."""
    import livetrain.training.registry as registry_module

    monkeypatch.setattr(registry_module, "KEEP_RECENT", 5)
    r = registry()
    r.propose(*cand(1, through=-1))
    for seq in range(40):  # every candidate promoted, each answering once
        r.observe(*block(seq, 1, written_at=float(seq)))
        r.record_answer(r.served.version, at=seq + 2.0)
        r.propose(*cand(1, through=seq))
    st = r.stats()
    assert st["versions_promoted"] == 40 and st["freshness_count"] == 39
    assert len(r.decisions) <= 10 and len(r.freshness_s) <= 10
    assert [d.version for d in r.decisions_since(38)] == [39, 40]  # counted from the run's first decision
    assert r.decisions_since(0)[0].version == r.decisions[0].version  # older ones: in decisions.jsonl only
    assert st["freshness_p50_s"] == 3.0  # each shard answered by a version trained on it 3 s after it was written


def test_rollback_serves_the_previous_version_and_is_recorded():
    r = registry()
    r.propose(*cand(1, through=-1))
    r.observe(*block(0, 1))
    r.propose(*cand(1, through=0))
    r.observe(*block(1, 1))
    assert r.served.version == 2
    d = r.rollback(reason="test")
    assert r.served.version == 1 and d.action == "rollback" and d.served_version == 2
    assert "from v2" in d.reason


def test_the_gate_reuses_the_served_answers_only_from_the_version_now_served():
    r = registry()
    r.propose(*cand(0, through=-1))
    r.observe(*block(0, 0))
    r.propose(*cand(1, through=0))
    r.observe(*block(1, 1))
    assert r.served.version == 2  # answers 1
    r.observe(*block(2, 0))  # scored by v2: all wrong
    if r.served.version != 1:  # not rolled back by itself yet
        r.rollback(reason="test")
    assert r.served.version == 1  # answers 0: right on block 2
    v, decisions = r.propose(*cand(1, through=1))  # judged on block 2 against v1
    assert [(d.version, d.action) for d in decisions] == [(v, "reject")]
    assert decisions[0].served["accuracy"] == 1.0 and decisions[0].candidate["accuracy"] == 0.0


def test_rollback_without_an_earlier_version_is_refused():
    from livetrain.training.registry import RollbackError

    r = registry()
    with pytest.raises(RollbackError, match="nothing is served"):
        r.rollback()
    r.propose(*cand(1, through=-1))
    r.observe(*block(0, 1))
    with pytest.raises(RollbackError, match="only version"):
        r.rollback()


def test_the_default_rollback_never_serves_again_a_version_rolled_back_from():
    from livetrain.training.registry import RollbackError

    r = registry(tolerance=1.0, rollback_min_rows=100)
    r.propose(*cand(0, through=-1))
    r.observe(*block(0, 0))  # v1 answers 0
    r.propose(*cand(1, through=0))
    r.observe(*block(1, 1))  # v2 answers 1
    (d,) = r.observe(*block(2, 0))  # v2 all wrong: rolled back by itself
    assert (d.action, d.version, r.served.version) == ("rollback", 1, 1)
    with pytest.raises(RollbackError, match="no version promoted before v1"):
        r.rollback(reason="one more")  # not back to v2
    for seq, v in ((3, 3), (4, 4)):
        r.propose(*cand(0, through=seq - 1))
        r.observe(*block(seq, 0))
        assert r.served.version == v
    assert r.rollback(reason="by hand").version == 3
    r.propose(*cand(0, through=4))
    r.observe(*block(5, 0))
    assert r.served.version == 5
    assert r.rollback(reason="by hand").version == 3  # v4 was rolled back from
    assert r.rollback(reason="by hand").version == 1  # v2 too


def xor_block(seq: int, rows: int = 500, flip: bool = False, seed: int = 0):
    """A learnable block: label = x0 > 0 (flipped when ``flip``: a poisoned block)."""
    rng = np.random.default_rng(seed + seq)
    x = rng.normal(size=(rows, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    if flip:
        y = 1 - y
    return BlockMeta(f"s{seq}", seq, rows, rows * 12, 0.0, 0.0), x, y


def weights_threshold(sign: float) -> dict[str, np.ndarray]:
    """An MLP predicting class 1 iff sign * x0 > 0."""
    m = MLP(2, 2, [4])
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.net[1].weight[0, 0] = 1.0
        m.net[1].weight[1, 0] = -1.0
        m.net[3].weight[1, 0] = 10.0 * sign
        m.net[3].weight[1, 1] = -10.0 * sign
    return {k: v.numpy().copy() for k, v in m.state_dict().items()}


def cand_w(w, through: int) -> tuple[Candidate, dict]:
    return Candidate(None, SPEC, through, 0.0, 0, 0.0, 0.0), w


def test_poisoned_burst_puts_the_gate_on_hold():
    r = Registry(GateConfig(holdout_fraction=0.0, min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000, alarm_hold_rows=3000), 2)
    good, bad = weights_threshold(1.0), weights_threshold(-1.0)
    r.propose(*cand_w(good, -1))
    seq = 0
    for seq in range(20):
        r.observe(*xor_block(seq))
    assert r.served.version == 1 and r.prequential.window_accuracy > 0.99
    for seq in range(20, 26):  # poisoned burst: every label flipped
        r.observe(*xor_block(seq, flip=True))
    assert r.drift.alarms and r.holding
    # evidence gathered during the burst is suspect: the next candidate is judged
    # only when clean rows arrive, and a model that learnt the poison loses there
    r.propose(*cand_w(bad, seq))
    decisions = []
    for s in range(seq + 1, seq + 4):
        decisions += r.observe(*xor_block(s))
    assert [d.action for d in decisions] == ["reject"] and r.served.version == 1


def test_a_feature_drift_alarm_alone_does_not_put_the_gate_on_hold():
    """x1, which the label does not depend on, moves: a PSI alarm reacts (the mix
    leans recent) but the served model errs no more, so promotion is not held."""
    r = served_well_for_20_blocks(alarm_hold_rows=3000)
    for seq in range(20, 26):
        meta, x, y = xor_block(seq)
        x[:, 1] += 3.0
        r.observe(meta, x, y)
    assert [a.detector for a in r.drift.alarms] == ["features:psi"]
    assert r.reaction.recent_fraction > 0.9 and not r.holding and r.hold_state() is None


def holding_after_noise(**gate) -> tuple[Registry, np.random.Generator]:
    """A good model served for 20 blocks, then 6 blocks of random labels: the gate holds."""
    r = Registry(GateConfig(min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000, alarm_hold_rows=10_000, **gate), 2)
    r.propose(*cand_w(weights_threshold(1.0), -1))
    for seq in range(20):
        r.observe(*xor_block(seq))
    rng = np.random.default_rng(1)
    for seq in range(20, 26):  # random labels: every model scores ~50%
        meta, x, _ = xor_block(seq)
        r.observe(meta, x, rng.integers(0, 2, len(x)))
    assert r.holding
    return r, rng


def served_well_for_20_blocks(**gate) -> Registry:
    r = Registry(GateConfig(holdout_fraction=0.0, min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000, **gate), 2)
    r.propose(*cand_w(weights_threshold(1.0), -1))
    for seq in range(20):
        r.observe(*xor_block(seq))
    return r


def test_a_burst_longer_than_alarm_hold_rows_is_held_until_it_ends():
    r = served_well_for_20_blocks(alarm_hold_rows=2000)
    rng = np.random.default_rng(1)
    decisions = []
    for seq in range(20, 40):  # 10,000 rows of random labels: 5x alarm_hold_rows
        r.propose(*cand_w(weights_threshold(-1.0 if seq % 2 else 1.0), seq - 1))  # coin tosses on these rows
        meta, x, _ = xor_block(seq)
        decisions += r.observe(meta, x, rng.integers(0, 2, len(x)))
        assert r.holding, f"the hold ended {seq - 20} blocks into the burst"
    assert len(decisions) == 20 and all(d.action == "reject" for d in decisions)
    assert r.served.version == 1
    for seq in range(40, 46):  # clean again: the served model errs as before the alarm
        r.observe(*xor_block(seq))
    assert not r.holding
    r.propose(*cand_w(weights_threshold(1.0), 45))  # the ordinary gate again: an equal candidate passes
    (d,) = r.observe(*xor_block(46))
    assert d.action == "promote"


def test_a_registry_restarted_during_a_burst_holds_on():
    r = served_well_for_20_blocks(alarm_hold_rows=2000)
    rng = np.random.default_rng(1)
    for seq in range(20, 26):
        meta, x, _ = xor_block(seq)
        r.observe(meta, x, rng.integers(0, 2, len(x)))
    r.propose(*cand_w(weights_threshold(1.0), 25))
    meta, x, _ = xor_block(26)
    (d,) = r.observe(meta, x, rng.integers(0, 2, len(x)))
    state = r.hold_state()
    assert d.action == "reject" and state == {"served_at_alarm": 1, "error_bar": state["error_bar"], "tests": 1,
                                              "rows": state["rows"]}
    assert 0.2 < state["error_bar"] < 0.5
    # as the registry actor comes back: the version its log served, a fresh drift detector
    again = Registry(r.cfg, 2)
    again.restore_served(r.served)
    again.resume_hold(state, anchor=r.served)
    assert again.holding and again.hold_state() == state
    for seq in range(27, 37):  # the burst goes on: no alarm from the fresh detector, still no promotion
        again.propose(*cand_w(weights_threshold(-1.0 if seq % 2 else 1.0), seq - 1))
        meta, x, _ = xor_block(seq)
        (d,) = again.observe(meta, x, rng.integers(0, 2, len(x)))
        assert d.action == "reject" and again.holding
    assert again.hold_state()["tests"] > state["tests"] and not again.drift.alarms  # counted on from the saved tests
    for seq in range(37, 42):
        again.observe(*xor_block(seq))
    assert not again.holding and again.hold_state() is None


def test_a_restarted_registrys_hold_ends_when_the_one_not_restarted_would():
    """The hold's rows go on after a restart: a registry that came back two blocks into
    a 5,000-row hold does not hold 5,000 rows more (clean data: its bar would pass
    candidates that are good, but not as much better as the hold asks)."""
    r = served_well_for_20_blocks(alarm_hold_rows=5000)
    rng = np.random.default_rng(1)
    for seq in range(20, 26):
        meta, x, _ = xor_block(seq)
        r.observe(meta, x, rng.integers(0, 2, len(x)))
    state = r.hold_state()
    assert r.holding and 0 < state["rows"] < 5000 and state["rows"] % 500 == 0
    again = Registry(r.cfg, 2)
    again.restore_served(r.served)
    again.resume_hold(state, anchor=r.served)
    assert again.hold_state() == state
    ended = {}
    for seq in range(26, 40):  # clean data from here on
        for reg in (r, again):
            reg.observe(*xor_block(seq))
            if not reg.holding:
                ended.setdefault(id(reg), seq)
    assert ended[id(again)] == ended[id(r)], ended


def test_alarm_hold_rows_0_means_no_hold():
    r = served_well_for_20_blocks(alarm_hold_rows=0)
    for seq in range(20, 26):
        r.observe(*xor_block(seq, flip=True))
    assert r.drift.alarms and not r.holding


def test_equal_candidate_is_not_promoted_while_holding_after_alarm():
    r, rng = holding_after_noise(holdout_fraction=0.0)
    r.propose(*cand_w(weights_threshold(1.0), 25))
    meta, x, _ = xor_block(26)
    d = r.observe(meta, x, rng.integers(0, 2, len(x)))
    assert [x.action for x in d] == ["reject"] and "holding needs" in d[0].reason
    assert r.served.version == 1


def test_significant_win_after_a_real_drift_ends_the_hold():
    r = Registry(GateConfig(holdout_fraction=0.0, min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000, alarm_hold_rows=10_000), 2)
    good, flipped = weights_threshold(1.0), weights_threshold(-1.0)
    r.propose(*cand_w(good, -1))
    for seq in range(20):
        r.observe(*xor_block(seq))
    for seq in range(20, 26):  # a real, learnable change: the label rule flips for good
        r.observe(*xor_block(seq, flip=True))
    assert r.holding
    r.propose(*cand_w(flipped, 25))  # learnt the new rule: far better, z >> 3
    (d,) = r.observe(*xor_block(26, flip=True))
    assert d.action == "promote" and "the hold ends" in d.reason and not r.holding
    # the ordinary gate again: a candidate within the tolerance is promoted
    r.propose(*cand_w(flipped, 26))
    (d,) = r.observe(*xor_block(27, flip=True))
    assert d.action == "promote" and r.served.version == 3


def test_a_modest_win_while_holding_promotes_once_but_keeps_the_hold():
    r = Registry(GateConfig(holdout_fraction=0.0, min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000, alarm_hold_rows=10_000), 2)
    r.propose(*cand_w(weights_threshold(1.0), -1))
    for seq in range(20):
        r.observe(*xor_block(seq))
    for seq in range(20, 26):
        r.observe(*xor_block(seq, flip=True))
    assert r.holding
    def mostly_flipped(seq: int):
        meta, x, y = xor_block(seq)
        return meta, x, np.where(np.arange(len(y)) % 5 < 3, 1 - y, y)  # the flipped rule: right on 60%

    r.propose(*cand_w(weights_threshold(-1.0), 25))
    (d,) = r.observe(*mostly_flipped(26))  # z = 100 / sqrt(500) = 4.5: promoted, below alarm_release_z
    assert d.action == "promote" and "hold ends" not in d.reason and r.holding
    r.propose(*cand_w(weights_threshold(-1.0), 26))
    (d,) = r.observe(*mostly_flipped(27))  # no gain over the new served version: still held
    assert d.action == "reject" and "holding needs" in d.reason and r.holding


def test_each_test_of_the_same_hold_needs_a_larger_z():
    def win_by(seq: int, flipped_rows: int):
        """Labels of the flipped rule on ``flipped_rows`` of 500: the flipped model
        beats the served one with z = (2 * flipped_rows - 500) / sqrt(500)."""
        meta, x, y = xor_block(seq)
        return meta, x, np.where(np.arange(len(y)) < flipped_rows, 1 - y, y)

    r, rng = holding_after_noise(holdout_fraction=0.0)
    r.propose(*cand_w(weights_threshold(-1.0), 25))
    (d,) = r.observe(*win_by(26, 289))  # z 3.49, gain 0.156: the hold's first test passes
    assert d.action == "promote" and "test 1 of the drift alarm's hold" in d.reason

    r, rng = holding_after_noise(holdout_fraction=0.0)
    for seq in (26, 27, 28):  # three candidates no better than the served model
        r.propose(*cand_w(weights_threshold(1.0), seq - 1))
        meta, x, _ = xor_block(seq)
        (d,) = r.observe(meta, x, rng.integers(0, 2, len(x)))
        assert d.action == "reject" and f"test {seq - 25} of the hold" in d.reason
    r.propose(*cand_w(weights_threshold(-1.0), 28))
    (d,) = r.observe(*win_by(29, 289))  # the same win, as the fourth test: the bar is 3.58
    assert d.action == "reject" and "z >= 3.58 (test 4 of the hold)" in d.reason
    assert r.served.version == 1 and r.holding


def test_served_version_is_rolled_back_when_previous_beats_it_on_live_rows():
    r = Registry(GateConfig(holdout_fraction=0.0, min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000, rollback_margin=0.05, tolerance=1.0), 2)
    r.propose(*cand_w(weights_threshold(1.0), -1))
    r.observe(*xor_block(0))
    r.propose(*cand_w(weights_threshold(-1.0), 0))  # tolerance 1.0 lets a bad one through
    r.observe(*xor_block(1))
    assert r.served.version == 2 and r.previous.version == 1
    decisions = []
    for seq in range(2, 6):
        decisions += r.observe(*xor_block(seq))
    assert [d.action for d in decisions] == ["rollback"]
    assert r.served.version == 1 and "below v1's" in decisions[0].reason


def test_drift_alarm_raises_the_recent_share_and_learning_rate_and_shortens_the_window():
    r = Registry(GateConfig(holdout_fraction=0.0, min_eval_rows=100, window_rows=1000, rollback_min_rows=1000), 2, recent_fraction=0.7,
                 window_rows=4000)
    r.propose(*cand_w(weights_threshold(1.0), -1))
    for seq in range(20):
        r.observe(*xor_block(seq))
    assert r.reaction.recent_fraction == pytest.approx(0.7) and r.reaction.lr_scale == 1.0
    assert r.reaction.window_rows_scale == 1.0
    seq = 20
    while not r.drift.alarms and seq < 40:  # the flipped concept: an alarm within a few blocks
        r.observe(*xor_block(seq, flip=True))
        seq += 1
    assert r.drift.alarms
    assert r.reaction.recent_fraction > 0.9 and r.reaction.lr_scale > 1.0
    shortened = r.reaction.window_rows_scale
    assert shortened < 0.5
    for seq in range(seq, seq + 2):  # 1000 more rows of the new regime: the window (4000 rows) grows by them
        r.observe(*xor_block(seq, flip=True))
    assert len(r.drift.alarms) == 1
    assert 4000 * r.reaction.window_rows_scale == pytest.approx(4000 * shortened + 1000)


def varied_block(seq: int, label: int, rows: int = 800):
    """Rows with distinct features (held-out rows are picked by a hash of them)."""
    meta = BlockMeta(f"s{seq}", seq, rows, rows * 12, 0.0, 0.0)
    x = np.random.default_rng(seq).standard_normal((rows, 2), dtype=np.float32)
    return meta, x, np.full(rows, label, np.int64)


def test_held_out_rows_decide_a_candidate_without_waiting_for_the_next_shard():
    from livetrain.training.gate import holdout_mask

    r = registry(holdout_fraction=0.25)
    r.propose(*cand(1, through=-1))
    r.observe(*varied_block(0, 1))
    assert r.served.version == 1
    meta, x, y = varied_block(1, 0)  # the concept changes: class 0 now
    r.observe(meta, x, y)
    _, decisions = r.propose(*cand(0, through=1))  # trained on seq 1, its held-out rows left out
    assert [d.action for d in decisions] == ["promote"] and r.served.version == 2
    assert decisions[0].eval_rows == holdout_mask(x, 0.25).sum() >= 100  # judged on seq 1's held-out rows only
    assert decisions[0].candidate["accuracy"] == 1.0 and decisions[0].served["accuracy"] == 0.0

    plain = registry(holdout_fraction=0.0)  # without held-out rows the same candidate waits for seq 2
    plain.propose(*cand(1, through=-1))
    plain.observe(*varied_block(0, 1))
    plain.observe(meta, x, y)
    _, decisions = plain.propose(*cand(0, through=1))
    assert decisions == [] and plain.pending is not None


def test_held_out_rows_count_only_for_the_newest_shard_of_both_versions():
    r = registry(holdout_fraction=0.25)
    r.observe(*varied_block(0, 1))
    r.observe(*varied_block(1, 1))
    r.propose(*cand(1, through=1))  # first candidate: judged on seq 1's held-out rows
    assert r.served.version == 1 and r.served.trained_through == 1
    # an older candidate (through 0) is judged on what the served one has not
    # trained on either: seq 1's held-out rows, not seq 0's
    _, decisions = r.propose(*cand(1, through=0))
    meta, x, _ = varied_block(1, 1)
    from livetrain.training.gate import holdout_mask

    assert decisions[0].eval_rows == holdout_mask(x, 0.25).sum()


def test_held_out_rows_of_a_poisoned_shard_do_not_end_the_hold():
    """With ``gate.holdout_fraction`` a candidate trained on a poisoned shard is
    judged at once on that shard's held-out rows, which are poisoned too: the
    hold after the alarm must still keep it out."""
    r, _ = holding_after_noise(holdout_fraction=0.25, tolerance=1.0)  # the tolerance alone would promote it
    _, decisions = r.propose(*cand_w(weights_threshold(-1.0), 25))  # learnt noise: judged now, on seq 25's held-out rows
    assert [d.action for d in decisions] == ["reject"] and "holding needs" in decisions[0].reason
    assert 100 <= decisions[0].eval_rows < 250 and r.served.version == 1


def test_a_shard_too_small_to_decide_on_alone_holds_nothing_out_and_waits():
    r = registry(holdout_fraction=0.25)  # min_eval_rows 100: blocks under 400 rows hold none out
    r.propose(*cand(1, through=-1))
    r.observe(*varied_block(0, 1))
    r.observe(*varied_block(1, 0, rows=300))
    _, decisions = r.propose(*cand(0, through=1))
    assert decisions == [] and r.pending is not None  # judged by the next shard, on all its rows
    (d,) = r.observe(*varied_block(2, 0, rows=300))
    assert d.action == "promote" and d.eval_rows == 300


def test_a_candidate_better_than_the_served_model_is_not_held_back_by_older_versions():
    """v1 is right on the newest rows, the served v2 always wrong, the candidate
    right on half of them. Comparing it with v1 would keep v2 serving: a worse
    model. The candidate goes in (and the check still holds one that is worse
    than the served model: test_the_tolerance_is_not_spent_again_at_every_promotion)."""
    r = registry(tolerance=0.015)
    r.propose(Candidate(None, SPEC, -1, 0.0, 0, 0.0, 0.0), weights_above(0.0))  # class 1 everywhere on a ramp
    r.observe(*ramp(0))
    meta, x, _ = ramp(1)
    r.propose(*cand(0, through=0))
    r.observe(meta, x, np.zeros(100, np.int64))  # a spell of class 0: v2 right, v1 wrong
    assert r.served.version == 2
    r.propose(Candidate(None, SPEC, 1, 0.0, 0, 0.0, 0.0), weights_above(0.5))
    (decision,) = r.observe(*ramp(2))  # class 1 again: v1 1.0, served v2 0.0, the candidate 0.5
    assert decision.action == "promote", decision.reason
    assert decision.candidate["accuracy"] == pytest.approx(0.5) and decision.served["accuracy"] == 0.0
    assert r.served.version == 3


def flipped_after_a_good_run(rows: int = 200) -> tuple[Registry, int]:
    """A good model served on 20 shards of ``rows`` rows, then the rule flips for
    good (learnable): the gate holds. Returns the registry and the next seq.
    ``rows * holdout_fraction`` (50) is under ``min_eval_rows`` (100): these shards
    hold rows out only during a hold, down to ``holdout_min_rows`` (20)."""
    r = Registry(GateConfig(min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000, alarm_hold_rows=10_000,
                            holdout_fraction=0.25, holdout_min_rows=20), 2)
    r.propose(*cand_w(weights_threshold(1.0), -1))
    for seq in range(20):
        r.observe(*xor_block(seq, rows=rows))
    seq = 20
    while not r.holding:
        assert seq < 40, "no drift alarm"
        r.observe(*xor_block(seq, rows=rows, flip=True))
        seq += 1
    assert not r.small_holdout(19) and r.small_holdout(seq - 1)
    return r, seq


def small_cand(w, through: int, small: bool) -> tuple[Candidate, dict]:
    return Candidate(None, SPEC, through, 0.0, 0, 0.0, 0.0, small_holdout=small), w


def test_during_a_hold_a_small_shards_held_out_rows_promote_a_candidate_at_once():
    """No newer shard needed: the candidate trained on the shard the hold marked
    (leaving its held-out rows out) is promoted on those ~50 rows when it clears
    the hold's bar, where the next shard could be minutes away."""
    from livetrain.training.gate import holdout_mask

    r, seq = flipped_after_a_good_run()
    meta, x, y = xor_block(seq, rows=200, flip=True)
    r.observe(meta, x, y)
    assert r.small_holdout(seq)
    _, decisions = r.propose(*small_cand(weights_threshold(-1.0), seq, small=True))
    assert [d.action for d in decisions] == ["promote"] and r.served.version == 2
    assert decisions[0].eval_rows == holdout_mask(x, 0.25).sum() < 100  # those rows alone
    assert decisions[0].candidate["accuracy"] == 1.0


def test_a_candidate_that_trained_on_the_held_out_rows_waits_for_the_next_shard():
    """The registry uses a hold's small held-out share only when the candidate says
    it left it out: a trainer that did not ask (or asked a restarted registry)
    trained on those rows, and judging it on them would flatter it."""
    r, seq = flipped_after_a_good_run()
    r.observe(*xor_block(seq, rows=200, flip=True))
    _, decisions = r.propose(*small_cand(weights_threshold(-1.0), seq, small=False))
    assert decisions == [] and r.pending is not None and r.served.version == 1
    (d,) = r.observe(*xor_block(seq + 1, rows=200, flip=True))  # judged on the next shard, as without
    assert d.action == "promote" and d.eval_rows == 200


def test_a_few_held_out_rows_never_reject_a_candidate():
    """Not proven on ~50 rows is not disproven: the next shard judges it as usual."""
    r, seq = flipped_after_a_good_run()
    r.observe(*xor_block(seq, rows=200, flip=True))
    _, decisions = r.propose(*small_cand(weights_threshold(1.0), seq, small=True))  # no better than served
    assert decisions == [] and r.pending is not None
    (d,) = r.observe(*xor_block(seq + 1, rows=200, flip=True))
    assert d.action == "reject" and "holding needs" in d.reason and d.eval_rows > 200


def test_outside_a_hold_small_shards_hold_nothing_out():
    r = Registry(GateConfig(min_eval_rows=100, max_eval_rows=500, window_rows=1000, rollback_min_rows=1000,
                            holdout_fraction=0.25, holdout_min_rows=20), 2)
    r.propose(*cand_w(weights_threshold(1.0), -1))
    r.observe(*xor_block(0, rows=200))
    r.observe(*xor_block(1, rows=200, flip=True))  # a change, but no alarm yet: no hold
    assert not r.holding and not r.small_holdout(1)
    _, decisions = r.propose(*small_cand(weights_threshold(-1.0), 1, small=True))
    assert decisions == [] and r.pending is not None  # the flag alone does not make rows held out
