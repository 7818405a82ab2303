"""Wires livetrain together. The data flow, as this module builds it:

    state dir: an exclusive OS lock on <state_dir>/livetrain.lock, held by the driver
        from start() to stop() (livetrain.state_lock): one run per state dir

    schema: declared, or (schema.infer) defined by the first shard that fits,
        pinned in the Manifest; resolved before anything that depends on it
        starts (model width, buffer, Serve): start() waits for that shard

    landing dir (*.parquet, local or s3://; written by the user, or by SyntheticStream)
        |  DirectorySource.poll            [IngestLoop thread, driver process;
        |  at most every source.poll_interval_s, stats new names only]
        v
        |  XXH3-128 content hash on a hashing thread, in landing order
        v
    Manifest (SQLite) -- discover (stat, then hash; same bytes: a duplicate) -> claim
        |
        v
    IngestActor xN (beside the driver): file still as its record says? (else its
        new bytes are read and recorded) -> read by row group -> validate ->
        quarantine/ ; streams one chunk object per read (up to 8 blocks) and a
        Chunk item naming its blocks (the driver owns them: it made the call)
        v
    ModelRegistry.observe_many(metas, BlockRefs)   test, one call per batch, in
        |                                arrival order: served model scores each block,
        |                                drift detectors watch errors + features;
        |                                marks the shard if the gate holds (small_holdout)
        v
    ReplayBufferActor.add_shards(commits, BlockRefs)   then train: window + reservoir;
        |   the shards finished since the last call, in one call that also marks
        |   them ingested (exactly once); a shard over ingest.commit_rows goes
        |   in by parts as it is read (row watermark in the manifest; withdraw_shard takes
        |   the parts out again if the rest turns out unreadable); may make ingest wait
        |   (buffer.backpressure: coverage) ; snapshot for restarts
        |  Sample(BlockRefs): unseen blocks oldest first (a backlog shared out
        |  among the ranks), then the window/reservoir mix
        |                                   [TorchTrainer job, fit() in a driver thread]
        v
    train_loop_per_worker x2 (DDP/gloo): fetch blocks zero-copy (slices of chunks), K steps
        (the newest shard's held-out rows left out: gate.holdout_fraction; on a
        new newest shard rank 0 asks ModelRegistry.small_holdout(seq), all ranks
        follow: during a hold, down to gate.holdout_min_rows),
        rank 0 -> ModelRegistry.propose(Candidate(weights ref))   (time cadence; when
                  a newer shard, or a new part of the newest one, was trained on)
        all    -> ray.train.report(checkpoint)                    (time cadence)
        (train.anchor_l2: rank 0 long-polls ModelRegistry.wait_for_version; on a
        newly served version every rank fetches it and anchors on it)
        v
    ModelRegistry: gate on unseen rows: newer shards, and the held-out rows of the
        newest shard trained on (on hold after a drift alarm; then a marked shard's
        few held-out rows can promote a candidate that left them out) -> promote /
        reject / rollback -> decisions.jsonl, alarms.jsonl, hold.json, served/vN/model.pt,
        ServedVersion(weights re-put, registry-owned); drift reactions ->
        ReplayBufferActor.set_mix (sampling mix) and, via report_train, the lr
        |  wait_for_version (long-poll)
        v
    ModelServer replicas (Ray Serve, FastAPI): swap in place; POST /predict,
        GET /model; first answer per version -> ModelRegistry.record_answer
        (closes the freshness of every shard that version trained on)

    Pipeline.run polls ingest counters, buffer and registry stats every
    ``_TICK_S`` -> LiveView (stderr), and every ``tracking.log_every_s`` ->
    Tracker (W&B + metrics.jsonl; quarantine reasons flattened as
    ``quarantine/<reason>``); each tick, new decisions and alarms -> Tracker
    events (each promoted or rolled-back version a W&B model artifact with
    aliases ``served`` and ``vN``), and
    publishes the snapshot to the Control actor (named, beside the driver),
    which answers with any stop request: ``livetrain status`` reads the
    snapshot there, ``livetrain stop`` sets the request (seen within a tick;
    the pipeline then stops as on Ctrl-C; Ctrl-C and SIGTERM set a flag read
    at the next tick).

    With ``storage.uri`` (s3://..., livetrain.storage.Store): Ray Train writes
    its checkpoints there; the registry pushes served versions and its logs,
    the buffer its snapshot, Pipeline.run a SQLite copy of the manifest every
    ``storage.sync_interval_s``; a fresh state dir is restored from it at start.

What each loop waits on: the IngestLoop on ``ray.wait`` over in-flight shards
and its one outstanding ``add_shards`` call (at most ``source.poll_interval_s``;
it never blocks on the buffer, nor on a remote landing directory's listing,
which runs on a thread) and, with ``buffer.backpressure: coverage``, on
the buffer's sample-to-insert limiter, which stops new claims at
``ingest.max_in_flight``; trainers on ``ReplayBufferActor.sample``
(a condition, until ``train.min_buffer_rows``; each worker's next draw is in
flight while it trains a round); replicas on
``wait_for_version`` (a condition in the registry) and requests on
``@serve.batch`` (``serve.batch_wait_timeout_s``); the synthetic writer on
its pacing schedule. Stopping closes the buffer, which every trainer sees in
its next sample; they checkpoint once more and return, while Serve's
replicas drain (the app is deleted once the probe thread has stopped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from livetrain.actors.buffer_actor import BUFFER_ACTOR_CPUS, BUFFER_NAME, ReplayBufferActor
from livetrain.actors.ingest import INGEST_ACTOR_CPUS, IngestLoop
from livetrain.actors.manifest import MANIFEST_FILE, Manifest
from livetrain.actors.schema_pin import resolve_schema
from livetrain.actors.synthetic import SyntheticStream
from livetrain.actors.synthetic import feature_names as synthetic_feature_names
from livetrain.config import Config, ConfigError, SchemaConfig
from livetrain.control import AlreadyRunning, job_submission_id, start_control
from livetrain.live_view import LiveView
from livetrain.messages import Decision
from livetrain.serving.app import APP_NAME, start_serving
from livetrain.serving.auth import auth_headers
from livetrain.serving.deployment import ray_env as serving_ray_env
from livetrain.state_lock import StateDirLock
from livetrain.storage import Store
from livetrain.storage import configure as configure_storage
from livetrain.tracking import RUN_ID_FILE, Tracker
from livetrain.training.models import model_spec
from livetrain.training.registry_actor import REGISTRY_ACTOR_CPUS, REGISTRY_NAME, SERVED_DIR, ModelRegistry
from livetrain.training.trainer import make_trainer

_TICK_S = 0.5
SUMMARY_KEYS = (
    "rows_ingested",
    "rows_quarantined",
    "shards_ingested",
    "train_steps",
    "versions_proposed",
    "versions_promoted",
    "served_version",
    "prequential_accuracy",
    "freshness_p50_s",
    "freshness_p95_s",
)


def _make_dir(path: Path, key: str) -> None:
    """Create a local directory the run needs, before Ray starts: a file there, no
    permission or a read-only disk is a config error naming ``key``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot use {str(path)!r} as a directory: {e.strerror}") from e


class Pipeline:
    def __init__(self, cfg: Config, probe_traffic: bool = True) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir).resolve()
        self.probe_traffic = probe_traffic
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._owns_ray = False
        self._train_error: BaseException | None = None
        self._stop_error: BaseException | None = None
        self.final: dict[str, Any] = {}
        """The summary ``stop`` leaves (empty when it stopped before ingest started)."""
        self._thread_error: tuple[str, BaseException] | None = None
        self._decisions_seen = 0
        self._alarms_seen = 0
        self._counted_on: dict[str, str | None] = {"decisions": None, "alarms": None}
        """The registry instance whose decisions / alarms those counts are (it restarts when it dies)."""
        self._probe = {"ok": 0, "no_model": 0, "failed": 0}
        """Probe answers; ``no_model``: 503 "no model has been promoted yet" (not a drop)."""
        self.started_at = time.time()
        self._t0 = time.monotonic()  # durations: immune to the wall clock being set
        self.first_promotion_s: float | None = None
        self.url: str | None = None
        self.store: Store | None = None
        self._pushed_at = 0.0
        self.stop_reason: str | None = None
        """Why ``run`` returned early: the stop request of ``livetrain stop``, or a signal."""
        self.interrupted: str | None = None
        """Set by a signal handler (the name of the signal): ``run`` returns at its next tick.
        A flag, not an exception: one raised mid-tick could drop a decision half logged."""
        self.looping = False
        """``run``'s loop is going (a signal can wait for its next tick)."""
        # an existing cluster: ray.address, or RAY_ADDRESS as a Ray job's driver gets it
        self.cluster_address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        self._lock = StateDirLock(self.state_dir)
        """One run per state dir, whatever Ray each runs on: held from ``start`` to ``stop``."""

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        cfg, ns = self.cfg, self.cfg.ray.namespace
        declared = _declared_schema(cfg)  # a synthetic stream that cannot match fails here, before Ray
        _make_dir(self.state_dir, "state_dir")
        # before anything is written there (a second run stops here, touching nothing)
        self._lock.acquire({"pid": os.getpid(), "job_id": job_submission_id(), "namespace": ns})
        if isinstance(cfg.landing_dir, Path):
            _make_dir(cfg.landing_dir, "source.path")
        if not ray.is_initialized():
            if self.cluster_address is None:  # Serve's ingress is fixed when Ray's processes start
                os.environ.update(serving_ray_env(cfg.serve))
                # Ray Train's preemption watcher drains workers on a node the cloud is taking
                # back; one machine has no other node to move to (and its restartable actor,
                # holding handles, logs at every start that a restart may fail). Yours to override
                os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            ray.init(  # "local": a new Ray, even where `ray start --head` recorded one (None would join it)
                address=self.cluster_address or "local",
                num_cpus=None if self.cluster_address else self._local_cpus(),
                namespace=ns,
                include_dashboard=False,
                configure_logging=False,
                runtime_env={"worker_process_setup_hook": "livetrain.worker_setup.quiet_without_dashboard"},
            )
            self._owns_ray = True
        # the coordinating actors live beside the driver (the head on a cluster), like
        # Ray Train's controller; soft, so a driver node without spare CPU still works
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        try:  # first: a second livetrain in this namespace stops here, touching nothing
            self.control = start_control(ns, self._identity(), here)
        except AlreadyRunning as e:
            raise ConfigError(f"ray.namespace: {e}") from e
        configure_storage(cfg.storage)  # source shards on s3:// are opened with its endpoint
        self.store = Store.from_config(cfg.storage)
        if self.store is not None:  # a fresh state dir continues from shared storage
            self.store.check()
            restored = self.store.restore(self.state_dir)
            if restored:
                print(f"livetrain: restored {len(restored)} state files from {cfg.storage.uri}", file=sys.stderr)
        self.manifest = Manifest(self.state_dir)
        # everything below depends on the schema (model width, blocks): pin it first (after
        # a restore, which brings the manifest back); with schema.infer this waits for a shard
        # ends at Ctrl-C (stop()) or `livetrain stop`, which run() reads later
        schema = resolve_schema(declared, self.manifest, cfg.landing_dir, _StopOrRequest(self._stop, self._stop_requested),
                                cfg.source.poll_interval_s, cfg.duration_s)
        self.cfg = cfg = dataclasses.replace(cfg, schema=schema)
        self.tracker = Tracker(cfg.tracking, self.state_dir, cfg.to_dict())
        self._push_state(force=True)
        features = _feature_names(cfg)
        self.spec = model_spec(cfg.model, len(features), len(cfg.schema.classes))
        self.buffer = ReplayBufferActor.options(name=BUFFER_NAME, namespace=ns, scheduling_strategy=here).remote(
            cfg.buffer, str(self.state_dir), cfg.schema, cfg.ingest.block_rows, self.store, cfg.storage  # rebuilt from the state dir
        )
        self.registry = ModelRegistry.options(name=REGISTRY_NAME, namespace=ns, scheduling_strategy=here).remote(
            cfg.gate, len(cfg.schema.classes), str(self.state_dir), cfg.drift, cfg.buffer.recent_fraction, cfg.buffer.window_rows,
            (BUFFER_NAME, ns),  # drift reactions reach the sampling mix through it
            self.store,
        )
        self.ingest = IngestLoop(cfg, self.manifest, self.buffer, self.registry)
        # the train job and Serve each take seconds to come up: start both, and ingest
        # (it needs neither: shards already landed fill the buffer meanwhile), then wait
        # for Serve. The synthetic stream starts once it serves: its shards' freshness
        # would otherwise count the start-up, which no shard can beat
        self._spawn("train", self._fit)
        self._spawn("ingest", self.ingest.run, self._stop)
        self.url = start_serving(cfg, REGISTRY_NAME, ns, features)
        if cfg.source.kind == "synthetic":
            self.stream = SyntheticStream(cfg.synthetic, cfg.landing_dir)
            self._spawn("synthetic", self.stream.run, self._stop)
        if self.probe_traffic:
            self._spawn("probe", self._probe_loop)

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Run until ``duration_s`` passes, Ctrl-C, ``livetrain stop``, or training fails; return the summary."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        self.looping = True
        log_at = 0.0
        with LiveView(self.cfg.live_view, f"livetrain — {self.url}") as view:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self.interrupted is not None:
                    self.stop_reason = self.interrupted
                    break
                if self._train_error is not None:
                    raise RuntimeError("the training job failed") from self._train_error
                if self._thread_error is not None:  # the ingest loop or the synthetic writer died
                    name, err = self._thread_error
                    raise RuntimeError(f"livetrain's {name} thread failed: {type(err).__name__}: {err}") from err
                snap = self.snapshot()
                view.update(snap)
                if time.monotonic() >= log_at:  # the figures; decisions and alarms go as they come
                    log_at = time.monotonic() + self.cfg.tracking.log_every_s
                    self.tracker.log({**_numbers(snap), **self._live_metrics()})
                self._log_decisions()
                self._push_state()
                self.stop_reason = ray.get(self.control.publish.remote(snap))
                if self.stop_reason is not None:
                    break
                self._stop.wait(_TICK_S)
        return self.summary()

    def stop(self) -> None:
        """Stop everything this pipeline started; safe after a partial start."""
        try:
            self._shut_down()
        finally:  # last: a next run on this state dir may start
            self._lock.release()

    def _shut_down(self) -> None:
        self._stop.set()
        started = hasattr(self, "ingest")
        if hasattr(self, "control"):
            self.control.stopping.remote()
        if hasattr(self, "buffer"):
            try:
                ray.get(self.buffer.close.remote(), timeout=10)
            except Exception:
                pass
        for t in self._threads:  # probe requests count in the summary: none may meet a closing endpoint
            if t.name == "probe":
                t.join(timeout=10)
        # Serve's replicas drain while training takes its last checkpoint (seconds each)
        serving = self._delete_app(blocking=False)
        for t in self._threads:
            t.join(timeout=60 if t.name == "train" else 10)
        train_problem = self._train_problem()
        if train_problem:
            print(f"livetrain: {train_problem}", file=sys.stderr)
        if started:
            self.ingest.shutdown()
            self._log_decisions()
            self.final = self.summary()
            if train_problem:
                self.final["train_error"] = train_problem
            self._push_state(force=True)
        if serving and not self._owns_ray:  # on a cluster, gone before `livetrain stop` returns
            self._delete_app(blocking=True)
        for name in ("registry", "buffer"):
            if hasattr(self, name):
                ray.kill(getattr(self, name))
        if hasattr(self, "manifest"):
            self.manifest.close()
        if hasattr(self, "tracker"):
            if started:
                self.tracker.summary(self.final)
            self.tracker.close()
        if hasattr(self, "control"):  # last: `livetrain stop` returns when it hears this
            try:
                ray.get(self.control.stopped.remote(self.final if started else {}), timeout=10)
            except ray.exceptions.RayError:
                pass
            ray.kill(self.control)
        if self._owns_ray:
            ray.shutdown()

    def _delete_app(self, blocking: bool) -> bool:
        """Delete livetrain's Serve app: its replicas drain their requests, the rest of
        Serve dies with a Ray this pipeline started (``serve.shutdown()`` would also take
        it down, but its controller's graceful_shutdown ends by killing the actor it runs
        in, which the raylet reports as a failed task on the user's console) and stays up
        on a cluster, where others may use it. False when there was nothing to delete."""
        if not (ray.is_initialized() and hasattr(self, "control")):  # without it, the app may be another's
            return False
        from ray import serve

        try:
            serve.delete(APP_NAME, _blocking=blocking)
        except Exception:
            return False
        return True

    def _push_state(self, force: bool = False) -> None:
        """Mirror the manifest (a consistent SQLite copy) and the W&B run id to shared storage."""
        if self.store is None:
            return
        now = time.monotonic()
        if not force and now - self._pushed_at < self.cfg.storage.sync_interval_s:
            return
        self._pushed_at = now
        try:
            self.store.push_sqlite(self.manifest.backup, MANIFEST_FILE)
            run_id = self.state_dir / RUN_ID_FILE
            if run_id.exists():
                self.store.put_file(run_id, RUN_ID_FILE)
        except OSError as e:  # the next tick tries again
            print(f"livetrain: could not push state to {self.cfg.storage.uri}: {e}", file=sys.stderr)

    # --- the parts' threads ----------------------------------------------------

    def _spawn(self, name: str, fn, *args) -> None:
        def guarded() -> None:
            try:
                fn(*args)
            except BaseException as e:  # surfaced by run(): a dead ingest loop must not look like a quiet stream
                if not self._stop.is_set() and self._thread_error is None:
                    self._thread_error = (name, e)
                raise

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _fit(self) -> None:
        try:
            make_trainer(self.cfg, self.spec, self.buffer, self.registry).fit()
        except BaseException as e:  # surfaced by run(), or by stop() while it takes the last checkpoint
            if self._stop.is_set():
                self._stop_error = e
            else:
                self._train_error = e

    def _train_problem(self) -> str | None:
        """Why training may not have taken its last checkpoint, once ``stop`` joined it."""
        train = next((t for t in self._threads if t.name == "train"), None)
        if train is not None and train.is_alive():
            return "training did not stop within 60 s: its last checkpoint may be missing"
        if self._stop_error is not None:
            e = self._stop_error
            return f"training failed while stopping ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        return None

    def _probe_loop(self) -> None:
        """A trickle of real requests: freshness is measured at a version's first answer."""
        rng = random.Random(0)
        d = len(_feature_names(self.cfg))
        # with serve.auth_token_env, a probe without the token would be a 401, never an answer
        headers = {"content-type": "application/json", **auth_headers(self.cfg.serve.auth_token_env)}
        while not self._stop.wait(0.1):
            body = json.dumps({"instances": [[rng.random() for _ in range(d)]]}).encode()
            req = urllib.request.Request(self.url + "/predict", body, headers)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
                self._probe["ok"] += 1
            except urllib.error.HTTPError as e:  # before the first promotion: 503 with Retry-After
                self._probe["no_model" if e.code == 503 and e.headers.get("Retry-After") else "failed"] += 1
            except Exception:
                self._probe["failed"] += 1

    # --- views -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        reg = ray.get(self.registry.stats.remote())
        buf = ray.get(self.buffer.stats.remote())
        c = self.ingest.counters
        if self.first_promotion_s is None and reg["versions_promoted"]:  # not a version restored at start-up
            self.first_promotion_s = time.monotonic() - self._t0
        return {
            "rows_ingested": c.rows_ingested,
            "rows_quarantined": c.rows_quarantined,
            "shards_ingested": c.shards_ingested,
            "shards_quarantined": c.shards_quarantined,
            "shards_duplicate": c.shards_duplicate,
            "shards_changed_in_place": c.shards_changed_in_place,
            "shards_reread": c.shards_reread,
            "shards_retried": c.shards_retried,
            "quarantine_reasons": dict(c.reasons),
            "ingest_waits": buf.get("ingest_waits", 0),
            "buffer_rebuilt_rows": buf.get("rebuilt_rows", 0),
            "buffer_rows": buf["rows"],
            "buffer_bytes": buf["bytes"],
            "rows_evicted_unseen": buf["rows_evicted_unseen"],
            "train_samples_per_s": reg.get("train_samples_per_s"),
            "train_steps": reg.get("train_steps", 0),
            "train_loss": reg.get("train_loss"),
            "train_divergences": reg.get("train_divergences", 0),
            "train_resumed_from_step": reg.get("train_resumed_from_step"),
            **{k: reg[k] for k in ("versions_proposed", "versions_promoted", "versions_rejected", "served_version")},
            "prequential_accuracy": reg["prequential_accuracy"],
            "prequential_accuracy_window": reg["prequential_accuracy_window"],
            "versions_rolled_back": reg["versions_rolled_back"],
            "drift_alarms": reg["drift_alarms"],
            "holding_after_alarm": reg["holding_after_alarm"],
            "reaction_lr_scale": reg["reaction_lr_scale"],
            "reaction_recent_fraction": reg["reaction_recent_fraction"],
            "freshness_p50_s": reg["freshness_p50_s"],
            "freshness_p95_s": reg["freshness_p95_s"],
            "probe_requests_ok": self._probe["ok"],
            "probe_requests_no_model": self._probe["no_model"],
            "probe_requests_failed": self._probe["failed"],
            "endpoint": self.url,
            "elapsed_s": time.monotonic() - self._t0,
            "last_decision": getattr(self, "_last_decision", None),
        }

    def summary(self) -> dict[str, Any]:
        snap = self.snapshot()
        out = {k: snap.get(k) for k in SUMMARY_KEYS}
        out.update(
            shards_quarantined=snap["shards_quarantined"],
            **{k: snap[k] for k in ("shards_duplicate", "shards_changed_in_place", "shards_reread", "shards_retried",
                                    "quarantine_reasons", "ingest_waits", "buffer_rebuilt_rows")},
            rows_evicted_unseen=snap["rows_evicted_unseen"],
            train_samples_per_s=snap["train_samples_per_s"],
            prequential_accuracy_window=snap["prequential_accuracy_window"],
            versions_rolled_back=snap["versions_rolled_back"],
            drift_alarms=snap["drift_alarms"],
            first_promotion_s=self.first_promotion_s,
            probe_requests_ok=self._probe["ok"],
            probe_requests_no_model=self._probe["no_model"],
            probe_requests_failed=self._probe["failed"],
            elapsed_s=snap["elapsed_s"],
            state_dir=str(self.state_dir),
        )
        return out

    def _live_metrics(self) -> dict[str, float]:
        """The served model's windowed prequential figures and confusion counts, flattened."""
        live = ray.get(self.registry.live_report.remote())
        out = {f"prequential/{k}": v for k, v in (live["prequential_window"] or {}).items()}
        for i, row in enumerate(live["confusion_window"]):
            out.update({f"confusion/true{i}_pred{j}": n for j, n in enumerate(row)})
        return out

    def _log_decisions(self) -> None:
        new, instance = ray.get(self.registry.decisions.remote(self._decisions_seen))
        if instance != self._counted_on["decisions"]:  # the registry restarted: its count began again
            self._counted_on["decisions"] = instance
            if self._decisions_seen:
                self._decisions_seen = 0
                new, _ = ray.get(self.registry.decisions.remote(0))
        for d in new:
            if d.action != "supersede":
                self.tracker.event(d.action, **{k: v for k, v in asdict(d).items() if k != "action"})
                if d.action in ("promote", "rollback"):
                    self._log_model(d)
                self._last_decision = f"v{d.version} {d.action}: {d.reason}"
            self._decisions_seen += 1  # seen once logged: an error half-way logs the rest next time
        alarms, instance = ray.get(self.registry.alarms.remote(self._alarms_seen))
        if instance != self._counted_on["alarms"]:
            self._counted_on["alarms"] = instance
            if self._alarms_seen:
                self._alarms_seen = 0
                alarms, _ = ray.get(self.registry.alarms.remote(0))
        for a in alarms:
            self.tracker.event("drift_alarm", **asdict(a))
            self._last_decision = f"drift alarm ({a.detector}) at shard seq {a.seq}"
            self._alarms_seen += 1

    def _log_model(self, d: Decision) -> None:
        """The served version as a W&B model artifact (a reference when it is on object storage)."""
        rel = f"{SERVED_DIR}/v{d.version:06d}/model.pt"
        uri = f"{self.cfg.storage.uri.rstrip('/')}/{rel}" if self.cfg.storage.uri else None
        meta = {"version": d.version, "action": d.action, "reason": d.reason, "trained_through": d.trained_through,
                "eval_rows": d.eval_rows, "candidate": d.candidate, "served_before": d.served}
        self.tracker.log_model(d.version, self.state_dir / rel, uri, meta)

    def _stop_requested(self) -> str | None:
        """``livetrain stop`` while starting (run() reads it with each snapshot); sets ``stop_reason``."""
        self.stop_reason = ray.get(self.control.stop_request.remote(), timeout=30)
        return self.stop_reason

    def _identity(self) -> dict[str, Any]:
        """What ``livetrain status`` shows besides the figures: which run this is."""
        return {
            "namespace": self.cfg.ray.namespace,
            "state_dir": str(self.state_dir),
            "job_id": job_submission_id(),
            "driver_pid": os.getpid(),
            "started_at": self.started_at,
        }

    def _local_cpus(self) -> int:
        """Logical CPUs of a local Ray: ``ray.num_cpus``, else this machine's count and at
        least one more than livetrain's actors reserve (Ray waits forever for a replica or
        a train worker that does not fit); a ``ray.num_cpus`` they do not fit in is refused."""
        need = reserved_cpus(self.cfg)
        if self.cfg.ray.num_cpus is None:
            return max(os.cpu_count() or 1, math.ceil(need) + 1)  # the one more: Ray's own tasks
        if self.cfg.ray.num_cpus < need - 1e-9:
            raise ConfigError(
                f"ray.num_cpus: {self.cfg.ray.num_cpus} is less than the {need:g} CPUs livetrain's actors reserve "
                f"({_reservations_text(self.cfg)}); raise it (or unset it), or lower those"
            )
        return self.cfg.ray.num_cpus


def _reservations(cfg: Config) -> dict[str, float]:
    """The logical CPUs each kind of livetrain actor reserves, by the keys that set them."""
    return {
        "train.num_workers x train.cpus_per_worker": cfg.train.num_workers * cfg.train.cpus_per_worker,
        "serve.num_replicas x serve.num_cpus": cfg.serve.num_replicas * cfg.serve.num_cpus,
        f"ingest.num_actors x {INGEST_ACTOR_CPUS:g}": cfg.ingest.num_actors * INGEST_ACTOR_CPUS,
        "buffer and registry actors": BUFFER_ACTOR_CPUS + REGISTRY_ACTOR_CPUS,
    }


def reserved_cpus(cfg: Config) -> float:
    """Logical CPUs a run's actors reserve all together (the control actor takes none)."""
    return sum(_reservations(cfg).values())


def _reservations_text(cfg: Config) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in _reservations(cfg).items())


class _StopOrRequest:
    """A stop signal (``wait``, like the Event) that is also set by a stop request."""

    def __init__(self, stop: threading.Event, requested: Callable[[], str | None]) -> None:
        self._stop, self._requested = stop, requested

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout) or self._requested() is not None


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of a snapshot, with ``quarantine_reasons`` flattened as
    ``quarantine/<reason>`` (``nan feature`` -> ``quarantine/nan_feature``): rows for
    a per-row reason, shards for a whole-shard one (``quarantine/missing_columns``)."""
    out = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for reason, n in (d.get("quarantine_reasons") or {}).items():
        key = f"quarantine/{_slug(reason)}"
        out[key] = out.get(key, 0) + n
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "other"


def _declared_schema(cfg: Config) -> SchemaConfig:
    """The config's schema; with the synthetic source, ``infer`` means the stream's own."""
    if cfg.source.kind != "synthetic":
        return cfg.schema
    want = synthetic_feature_names(cfg.synthetic)
    if list(cfg.schema.classes) == [0, 1] and (cfg.schema.infer or cfg.schema.features == want):
        return dataclasses.replace(cfg.schema, infer=False, features=want)
    raise ConfigError(
        f"schema: the synthetic {cfg.synthetic.generator} stream writes features {want} "
        f"and labels [0, 1]; set schema.features and schema.classes to match (or schema.infer: true)"
    )


def _feature_names(cfg: Config) -> list[str]:
    s = cfg.schema
    if s.features is not None:
        return list(s.features)
    return [f"{s.feature_list_column}[{i}]" for i in range(int(s.num_features))]
