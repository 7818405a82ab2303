"""The registry actor's files across crashes and restarts, without Ray: the actor's class run in
the test, with the object store faked as the identity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_registry import SPEC, block, weights_predicting
from livetrain.config import GateConfig
from livetrain.history import read_history
from livetrain.messages import Candidate
from livetrain.storage import open_lines
from livetrain.training import registry_actor
from livetrain.training.checkpoint import load_model

GATE = GateConfig(min_eval_rows=100, max_eval_rows=1000, window_rows=1000, holdout_fraction=0.0, tolerance=1.0,
                  rollback_min_rows=100)


class NoObjectStore:
    """``ray.put`` / ``ray.get`` as the identity: all the actor asks of Ray here."""

    @staticmethod
    def put(value):
        return value

    @staticmethod
    def get(ref):
        return ref


@pytest.fixture
def start(monkeypatch, tmp_path):
    """Start (or restart, on the same state dir) the registry actor's logic."""
    monkeypatch.setattr(registry_actor, "ray", NoObjectStore)
    cls = registry_actor.ModelRegistry.__ray_metadata__.modified_class
    return lambda gate=GATE: cls(gate, 2, str(tmp_path))


def observe(reg, seq: int, label: int) -> None:
    with reg._lock:
        reg._apply(reg._reg.observe(*block(seq, label)))


def propose(reg, cls: int, through: int) -> int:
    return reg.propose(Candidate(weights_predicting(cls), SPEC, through, 0.0, 0, 0.0, 0.0))


def answers(path: Path) -> int:
    """The class the model saved at ``path`` answers."""
    return int(load_model(path)[0](torch.zeros((1, 2))).argmax())


def test_a_version_saved_but_never_logged_is_not_numbered_again(start, tmp_path):
    a = start()
    observe(a, 1, 0)
    assert propose(a, 0, 0) == 1
    observe(a, 2, 0)
    a._log.close()
    a._log = open(tmp_path / "lost.jsonl", "w")  # the crash: v2's model.pt saved, its promotion never logged
    assert propose(a, 0, 1) == 2
    b = start()
    assert b._served.version == 1 and b._reg.next_version == 3
    observe(b, 3, 1)
    assert propose(b, 1, 2) == 3 and b._served.version == 3
    assert answers(tmp_path / "served/v000003/model.pt") == 1
    assert start()._served.version == 3


def test_a_promoted_version_overwrites_a_model_pt_left_under_its_number(start, tmp_path):
    a = start()
    observe(a, 1, 0)
    propose(a, 0, 0)  # v1 answers 0
    a._reg.next_version = 1  # a log that lost v1 and a served/ it was not checked against
    observe(a, 2, 1)
    assert propose(a, 1, 1) == 1
    assert answers(tmp_path / "served/v000001/model.pt") == 1


def test_a_torn_last_line_does_not_swallow_the_next_decision(start, tmp_path):
    a = start()
    observe(a, 1, 0)
    propose(a, 0, 0)
    a._log.write('{"version": 2, "action": "rej')  # killed mid-line
    a._log.close()
    (tmp_path / "alarms.jsonl").write_text('{"at": 1.0, "detec')
    b = start()
    observe(b, 2, 1)
    assert propose(b, 1, 1) == 2 and b._served.version == 2
    b._log.close()
    assert [(e["version"], e["action"]) for e in read_history(tmp_path)] == [(1, "promote"), (2, "promote")]
    assert start()._served.version == 2
    with open_lines(tmp_path / "alarms.jsonl") as f:
        f.write('{"at": 2.0}\n')
    assert (tmp_path / "alarms.jsonl").read_text().splitlines()[-1] == '{"at": 2.0}'


def test_a_restarted_registrys_default_rollback_skips_versions_rolled_back_from(start, tmp_path):
    a = start()
    for seq in (1, 2, 3):  # all alike: the tolerance promotes each
        observe(a, seq, 0)
        propose(a, 0, seq)
    observe(a, 4, 0)
    assert a._served.version == 3 and a.rollback().version == 2
    a._log.close()
    b = start()
    assert b._served.version == 2 and b._reg.rolled_back_from == {3}
    assert b.rollback().version == 1  # not v3 again
    b._log.close()
    assert json.loads((tmp_path / "decisions.jsonl").read_text().splitlines()[-1])["served_version"] == 2


def test_a_rollback_to_a_version_whose_model_pt_is_unreadable_is_a_rollback_error(start, tmp_path):
    from livetrain.training.registry import RollbackError

    a = start()
    observe(a, 1, 0)
    propose(a, 0, 0)
    (tmp_path / "served/v000009").mkdir()
    (tmp_path / "served/v000009/model.pt").write_bytes(b"torn")
    with pytest.raises(RollbackError, match="v9 cannot be loaded"):
        a.rollback(9)
    assert a._served.version == 1


@pytest.mark.parametrize("after", ["reject", "supersede"])
def test_a_restarted_registry_rolls_back_by_itself_after_decisions_that_served_nothing_new(start, after):
    gate = GateConfig(min_eval_rows=100, max_eval_rows=1000, window_rows=1000, holdout_fraction=0.0,
                      tolerance=0.5, rollback_min_rows=100)
    a = start(gate)
    propose(a, 1, -1)
    observe(a, 0, 1)  # v1 answers 1
    propose(a, 0, 0)
    observe(a, 1, 0)  # v2 answers 0: promoted
    propose(a, 1, 1)  # v3 answers 1 ...
    if after == "supersede":
        propose(a, 1, 1)  # ... superseded by v4 (left pending)
    else:
        observe(a, 2, 0)  # ... rejected on rows that say 0
    a._log.close()
    assert json.loads((a._state / "decisions.jsonl").read_text().splitlines()[-1])["action"] == after
    b = start(gate)
    assert b._reg.previous is not None and b._reg.previous.version == 1
    observe(b, 10, 1)  # the concept flips back: v2 errs on every row, v1 is right
    assert b._served.version == 1


def test_a_restarted_registry_without_the_served_model_pt_serves_the_one_served_before_it(start, tmp_path):
    a = start()
    for seq, cls in enumerate((1, 1, 0)):  # the tolerance promotes each: v1, v2, v3 (answers 0)
        propose(a, cls, seq - 1)
        observe(a, seq, 1)
    a.rollback(2, "v3 is bad")
    propose(a, 1, 2)
    observe(a, 3, 1)  # v4 promoted
    a._log.close()
    assert a._served.version == 4
    (tmp_path / "served/v000004/model.pt").unlink()  # its save or push never completed
    b = start()
    assert b._served.version == 2  # not v3, the highest left on disk: it was rolled back from
    b._log.close()
    last = json.loads((tmp_path / "decisions.jsonl").read_text().splitlines()[-1])
    assert (last["action"], last["version"], last["served_version"]) == ("rollback", 2, 4)  # the switch is logged
    assert "model.pt is missing" in last["reason"]
    assert b._reg.rolled_back_from == {3, 4}
    shutil.copyfile(tmp_path / "served/v000003/model.pt", tmp_path / "served/v000004/model.pt")  # back from storage
    assert start()._served.version == 2  # still not v4: it was taken out of service


def test_only_the_newest_keep_versions_served_have_their_weights_kept_here_and_on_shared_storage(
        monkeypatch, tmp_path):
    """A long run promotes thousands of versions: only the newest ``gate.keep_versions``
    served keep their model.pt (a rollback to one counts as served again), on the state dir
    and on ``storage.uri``; a rollback to a deleted one says why, and a restart serves the
    same version and keeps deleting from where the log says."""
    from livetrain.config import StorageConfig
    from livetrain.storage import Store
    from livetrain.training.registry import RollbackError

    monkeypatch.setattr(registry_actor, "ray", NoObjectStore)
    cls = registry_actor.ModelRegistry.__ray_metadata__.modified_class
    gate = GateConfig(min_eval_rows=100, max_eval_rows=1000, window_rows=1000, holdout_fraction=0.0, tolerance=1.0,
                      rollback_min_rows=100, compare_versions=1, keep_versions=3)
    state, shared = tmp_path / "state", tmp_path / "shared"
    store = Store(StorageConfig(uri=str(shared)))

    def on(root: Path) -> list[int]:
        return sorted(int(p.parent.name[1:]) for p in (root / "served").glob("v*/model.pt"))

    a = cls(gate, 2, str(state), store=store)
    for seq in range(5):  # v1..v5, each promoted (the tolerance) on the block after its data
        propose(a, 0, seq - 1)
        observe(a, seq, 0)
    assert a._served.version == 5 and on(state) == on(shared) == [3, 4, 5]
    a.rollback(3, "by hand")  # v3 served again: v4, v5 and v3 kept
    propose(a, 0, 4)
    observe(a, 5, 0)  # v6: v3 was served more recently than v4
    assert on(state) == on(shared) == [3, 5, 6]
    a._log.close()
    b = cls(gate, 2, str(state), store=store)  # the older weights are in memory no longer
    assert b._served.version == 6
    with pytest.raises(RollbackError, match=r"v4's weights were deleted: only the newest 3 .*gate.keep_versions"):
        b.rollback(4)
    assert b.rollback().version == 3 and on(state) == on(shared) == [3, 5, 6]
    b._log.close()
    c = cls(GateConfig(**{**vars(gate), "keep_versions": 0}), 2, str(state), store=store)  # 0: keeps all
    for seq in range(6, 9):
        propose(c, 0, seq - 1)
        observe(c, seq, 0)
    assert on(state) == on(shared) == [3, 5, 6, 7, 8, 9]
    c._log.close()
    assert "decisions.jsonl" in store.restore(tmp_path / "fresh")  # the log, from its parts on the store
    assert (tmp_path / "fresh/decisions.jsonl").read_text() == (state / "decisions.jsonl").read_text()
