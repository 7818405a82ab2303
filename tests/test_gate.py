"""Gate arithmetic and decisions, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from livetrain.config import GateConfig
from livetrain.training.gate import Prequential, classification_metrics, confusion_matrix, decide, holds_out


def test_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(y, p, 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class 0: P=1/2 R=1/2 ; class 1: P=2/3 R=2/3
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_precision_and_recall_are_not_swapped_on_an_asymmetric_confusion():
    y = np.array([0, 0, 0, 1])
    p = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(confusion_matrix(y, p, 2), [[2, 1], [0, 1]])  # rows: true, columns: predicted
    m = classification_metrics(y, p, 2)
    # class 0: P=2/2 R=2/3 F1=4/5 ; class 1: P=1/2 R=1/1 F1=2/3
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_macro_metrics_average_over_the_classes_present_only():
    """A class neither in the labels nor predicted (2 of 3 here) is left out of the
    macro averages, as scikit-learn does; it does not pull them down as a 0."""
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 1, 1])
    m = classification_metrics(y, p, 3)
    # class 0: P=1/1 R=1/2 F1=2/3 ; class 1: P=2/3 R=2/2 F1=4/5
    assert m["precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m == pytest.approx(classification_metrics(y, p, 2))


def test_metrics_refuse_empty_input():
    with pytest.raises(ValueError):
        classification_metrics(np.array([]), np.array([]), 2)


def test_first_candidate_is_promoted():
    assert decide({"accuracy": 0.6}, None, GateConfig()).promote


def test_candidate_within_tolerance_is_promoted():
    v = decide({"accuracy": 0.895}, {"accuracy": 0.9}, GateConfig(tolerance=0.01))
    assert v.promote and "delta -0.0050" in v.reason


def test_candidate_worse_than_tolerance_is_rejected():
    v = decide({"accuracy": 0.85}, {"accuracy": 0.9}, GateConfig(tolerance=0.01))
    assert not v.promote and "0.8500 vs served 0.9000" in v.reason


def test_gate_uses_the_configured_metric():
    cand, served = {"accuracy": 0.95, "f1": 0.5}, {"accuracy": 0.9, "f1": 0.8}
    assert decide(cand, served, GateConfig(metric="accuracy")).promote
    assert not decide(cand, served, GateConfig(metric="f1")).promote


def test_prequential_window_forgets_old_rows():
    pq = Prequential(2, window_rows=100)
    pq.update(np.zeros(100), np.zeros(100))  # all right
    pq.update(np.zeros(100), np.ones(100))  # all wrong
    assert pq.accuracy == pytest.approx(0.5)
    assert pq.window_accuracy == pytest.approx(0.0)


def test_prequential_log_loss_is_the_mean_negative_log_probability_of_the_true_class():
    pq = Prequential(2, window_rows=100)
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    pq.update(np.array([0, 1, 1]), np.array([0, 0, 1]), probs)
    expected = -(np.log(0.8) + np.log(0.4) + np.log(0.7)) / 3
    assert pq.report(window=False)["log_loss"] == pytest.approx(expected)
    assert pq.report(window=True)["log_loss"] == pytest.approx(expected)


def test_a_row_the_model_overflowed_on_is_a_confident_miss_not_nan_in_the_log_loss_for_good():
    pq = Prequential(2, window_rows=3)
    pq.update(np.array([0, 1]), np.array([0, 0]), np.array([[0.8, 0.2], [np.nan, np.nan]]))
    pq.update(np.array([0, 1, 1]), np.array([0, 1, 1]), np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]))
    assert pq.report(window=False)["log_loss"] == pytest.approx(
        -(np.log(0.8) + np.log(1e-12) + np.log(0.8) + np.log(0.6) + np.log(0.7)) / 5)
    assert np.isfinite(pq.report(window=True)["log_loss"])


def test_prequential_window_keeps_the_newest_block_even_with_no_window_rows():
    pq = Prequential(2, window_rows=0)
    pq.update(np.zeros(10), np.zeros(10))
    pq.update(np.zeros(10), np.ones(10))
    assert pq.window_rows_seen == 10 and pq.window_accuracy == pytest.approx(0.0)


def test_cadence_is_due_every_period_and_optionally_at_start():
    from livetrain.training.learner import Cadence

    now = [0.0]
    c = Cadence(1.0, due_at_start=True, clock=lambda: now[0])
    assert c.due() and not c.due()
    now[0] = 0.99
    assert not c.due()
    now[0] = 1.0
    assert c.due()
    assert not Cadence(1.0, clock=lambda: 0.0).due()


def test_cadence_keeps_a_costly_action_to_its_share_of_time_and_never_brings_it_forward():
    """The trainer's proposals: copying a large model's weights out for 0.5 s puts the
    next proposal 5 s away (a tenth of the time), whatever ``propose_every_s`` says."""
    from livetrain.training.learner import Cadence
    from livetrain.training.trainer import PROPOSAL_SHARE

    now = [0.0]
    c = Cadence(0.25, due_at_start=True, clock=lambda: now[0])
    assert c.due()
    c.at_least(0.5 / PROPOSAL_SHARE)
    now[0] = 4.99
    assert not c.due()
    now[0] = 5.0
    assert c.due()
    c.at_least(0.0001)  # a cheap copy leaves the period in charge
    now[0] = 5.2
    assert not c.due()
    now[0] = 5.25
    assert c.due()


def test_anchor_penalty_pulls_weights_towards_the_anchor():
    import numpy as np
    import torch

    from livetrain.config import ModelConfig
    from livetrain.training.learner import Learner
    from livetrain.training.models import build_model, model_spec

    def drift_from_anchor(anchor_l2: float) -> float:
        torch.manual_seed(0)
        model = build_model(model_spec(ModelConfig(hidden=[8]), 2, 2))
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, anchor_l2=anchor_l2)
        learner.set_anchor({k: v.numpy() for k, v in start.items()})
        x = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
        learner.train_round(x, (x[:, 0] > 0).astype(np.int64), 50)
        return sum(float(((p - start[k]) ** 2).sum()) for k, p in model.named_parameters())

    assert drift_from_anchor(10.0) < 0.5 * drift_from_anchor(0.0)


def test_no_anchor_on_another_models_weights():
    """The served version may predate a change of ``model`` in the config: its
    weights are no anchor for the new one (and must not break training)."""
    import numpy as np
    import torch

    from livetrain.config import ModelConfig
    from livetrain.training.learner import Learner
    from livetrain.training.models import build_model, model_spec

    model = build_model(model_spec(ModelConfig(hidden=[8]), 2, 2))
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, anchor_l2=1.0)
    wider = build_model(model_spec(ModelConfig(hidden=[16]), 2, 2))
    assert not learner.set_anchor({k: v.detach().numpy() for k, v in wider.state_dict().items()})
    assert learner.anchor is None
    x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    assert np.isfinite(learner.train_round(x, (x[:, 0] > 0).astype(np.int64), 5).loss)
    assert learner.set_anchor({k: v.detach().numpy() for k, v in model.state_dict().items()})
    assert learner.anchor is not None


def test_lr_scale_multiplies_the_configured_rate():
    import torch

    from livetrain.training.learner import Learner

    model = torch.nn.Linear(2, 2)
    learner = Learner(model, torch.optim.AdamW(model.parameters(), lr=0.01), 4)
    learner.set_lr_scale(3.0)
    assert learner.optimizer.param_groups[0]["lr"] == 0.03
    learner.set_lr_scale(1.0)
    assert learner.optimizer.param_groups[0]["lr"] == 0.01


def test_fused_optimizer_takes_the_same_steps_as_plain_adamw():
    import torch

    from livetrain.training.learner import make_optimizer

    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    start = a.weight.detach().clone()
    opt_a = make_optimizer(a, lr=0.01, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1)
    assert opt_a.defaults["fused"]
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert not torch.allclose(a.weight, start)


def test_mcnemar_z_separates_signal_from_label_noise():
    from livetrain.training.gate import mcnemar_z

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    served = rng.integers(0, 2, 2000)
    cand = np.where(rng.random(2000) < 0.2, 1 - served, served)  # differs on 20% of rows
    assert abs(mcnemar_z(y, cand, served)) < 3  # random labels: no model is really better
    better = np.where(rng.random(2000) < 0.5, y, served)  # right on half the rows it disagrees
    assert mcnemar_z(y, better, served) > 3
    assert mcnemar_z(y, served, served) == 0.0


def test_all_the_tests_of_one_hold_pass_random_labels_no_more_often_than_three_tests():
    """A poisoned burst is tested on nearly every shard of a hold: with one fixed
    z bar the chances of a lucky promotion add up; the rising bar keeps all the
    tests of a hold together under 2.61 times one test's."""
    from livetrain.training.gate import hold_z_bar

    assert hold_z_bar(3.0, 1) == pytest.approx(3.0)
    bars = [hold_z_bar(3.0, k) for k in range(1, 31)]
    assert all(a < b for a, b in zip(bars, bars[1:]))
    with pytest.raises(ValueError, match="counts from 1"):
        hold_z_bar(3.0, 0)
    # McNemar on random labels: of the rows where two models disagree, each is right on half
    rng = np.random.default_rng(0)
    holds, tests, disagree = 40_000, 30, 200
    b = rng.binomial(disagree, 0.5, size=(holds, tests))
    z = (2 * b - disagree) / np.sqrt(disagree)
    one_test = float((z[:, 0] >= 3.0).mean())
    fixed = float((z >= 3.0).any(axis=1).mean())
    rising = float((z >= np.array(bars)).any(axis=1).mean())
    assert fixed > 10 * one_test  # what the hole was: 30 chances at the same bar
    assert rising <= 2.7 * one_test + 0.001, (rising, one_test)


def test_holdout_mask_is_a_stable_share_picked_by_content():
    from livetrain.training.gate import holdout_mask

    x = np.random.default_rng(0).standard_normal((20_000, 5), dtype=np.float32)
    m = holdout_mask(x, 0.2)
    assert m.dtype == bool and abs(m.mean() - 0.2) < 0.015
    assert np.array_equal(holdout_mask(x[5000:7000], 0.2), m[5000:7000])  # per row, not per block
    assert np.array_equal(holdout_mask(x[::-1], 0.2), m[::-1])
    copies = np.repeat(x[:50], 3, axis=0)  # copies of a row go the same way
    assert np.array_equal(holdout_mask(copies, 0.2), np.repeat(m[:50], 3))
    assert not holdout_mask(x, 0.0).any() and holdout_mask(x[:0], 0.2).shape == (0,)
    # wide rows (images): a difference in any column moves the row
    wide = np.zeros((4000, 300), np.float32)
    wide[:, 299] = np.arange(4000)
    assert abs(holdout_mask(wide, 0.2).mean() - 0.2) < 0.03


def test_a_block_whose_held_out_share_is_exactly_min_rows_holds_rows_out():
    assert holds_out(400, 0.25, 100)
    assert not holds_out(399, 0.25, 100)


def test_training_rows_leave_out_the_newest_shards_held_out_rows():
    from livetrain.training.gate import holdout_mask
    from livetrain.training.learner import Holdout

    rng = np.random.default_rng(1)
    blocks = [{"x": rng.standard_normal((300, 3), dtype=np.float32), "y": np.full(300, seq)} for seq in range(3)]
    holdout = Holdout(0.3, min_rows=0)
    x, y = holdout.training_rows(blocks, [0, 1, 2], ["a", "b", "c"], hold_from=2)
    held = holdout_mask(blocks[2]["x"], 0.3)
    assert (y == 0).sum() == 300 and (y == 1).sum() == 300  # older shards: every row
    assert (y == 2).sum() == 300 - held.sum() and held.sum() > 50
    kept = {r.tobytes() for r in x[y == 2]}
    assert not kept & {r.tobytes() for r in blocks[2]["x"][held]}
    again, _ = holdout.training_rows(blocks[2:], [2], ["c"], hold_from=2)  # the cached mask
    assert len(again) == 300 - held.sum()
    newer, _ = holdout.training_rows(blocks, [0, 1, 2], ["a", "b", "c"], hold_from=3)  # a newer shard arrived
    assert len(newer) == 900
    assert len(Holdout(0.0, 0).training_rows(blocks, [0, 1, 2], ["a", "b", "c"], 2)[0]) == 900
    # a block whose held-out rows could not decide alone (300 x 0.3 < 100) keeps every row
    assert len(Holdout(0.3, min_rows=100).training_rows(blocks, [0, 1, 2], ["a", "b", "c"], 2)[0]) == 900


def test_a_shard_tested_during_a_hold_holds_rows_out_down_to_holdout_min_rows():
    """``small``: the registry tested the shard during a hold (``Registry.small_holdout``);
    training then leaves out the same rows the registry judges on (``holdout_mask``)."""
    from livetrain.training.gate import holdout_mask
    from livetrain.training.learner import Holdout

    rng = np.random.default_rng(2)
    blocks = [{"x": rng.standard_normal((300, 3), dtype=np.float32), "y": np.full(300, seq)} for seq in range(2)]
    holdout = Holdout(0.3, min_rows=100, small_min_rows=50)  # 300 x 0.3 = 90: small only
    assert len(holdout.training_rows(blocks, [0, 1], ["a", "b"], 1)[0]) == 600
    _, y = Holdout(0.3, 100, 50).training_rows(blocks, [0, 1], ["a", "b"], 1, small=True)
    held = holdout_mask(blocks[1]["x"], 0.3)
    assert (y == 0).sum() == 300 and (y == 1).sum() == 300 - held.sum() and held.any()
    assert len(Holdout(0.3, 100, 100).training_rows(blocks, [0, 1], ["a", "b"], 1, small=True)[0]) == 600
