"""The Tracker: the ONE W&B run of a livetrain process, plus a local log.

Every metric and event goes to two places:

- ``<state_dir>/metrics.jsonl``: one JSON object per line, flushed as it is
  written, so ``livetrain`` can print and plot a run with no account and the
  log survives a crash (a torn last line is skipped on read);
- the W&B run, when W&B is on. The run id is kept in
  ``<state_dir>/wandb_run_id``, so restarting livetrain on the same state dir
  resumes the same run instead of starting a new one.

W&B is optional at run time: if it cannot start or fails later, the Tracker
warns once on stderr and carries on with the local log alone. Nothing here
imports ``ray``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from livetrain.config import TrackingConfig
from livetrain.storage import open_lines

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id"
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def resolve_mode(setting: str, environ: dict[str, str] | None = None) -> str:
    """The W&B mode a run uses: ``online``, ``offline`` or ``disabled``.

    An explicit ``tracking.wandb`` wins. ``auto`` defers to ``WANDB_MODE``
    when it is set (so tests and CI can force ``disabled``), else goes online
    only when ``WANDB_API_KEY`` is set: never prompt for a login.
    """
    if setting != "auto":
        return setting
    env = os.environ if environ is None else environ
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode in _ENV_MODES:
        return _ENV_MODES[env_mode]
    return "online" if env.get("WANDB_API_KEY") else "offline"


def stable_run_id(state_dir: Path) -> str:
    """The run id stored in the state dir, created on first use."""
    path = state_dir / RUN_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:12]  # lowercase alphanumerics: a valid W&B id
    path.write_text(run_id + "\n")
    return run_id


def read_metrics(state_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``<state_dir>/metrics.jsonl``, oldest first.

    Lines that do not parse (a write torn by a crash) are skipped.
    """
    path = Path(state_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with path.open() as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: numpy/torch scalars via ``.item()``, else ``str``."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(value)


class Tracker:
    """Owns the process's W&B run and the local metrics log.

    Thread-safe: the driver loop and callbacks may log from several threads.
    Use as a context manager or call :meth:`close` (idempotent).
    """

    def __init__(self, cfg: TrackingConfig, state_dir: str | os.PathLike, config: dict[str, Any]) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.mode = resolve_mode(cfg.wandb)
        """Resolved W&B mode: ``online``, ``offline`` or ``disabled``."""
        self.run_id: str | None = None
        """The W&B run id (None when W&B is disabled)."""
        self._lock = threading.Lock()
        self._warned = False
        self._artifact_warned = False
        self._closed = False
        self._log = open_lines(self.state_dir / METRICS_FILE, buffering=1)
        self._run: Any = None
        if self.mode != "disabled":
            self._run = self._start_run(cfg, config)

    @property
    def wandb_active(self) -> bool:
        """Whether metrics currently also go to a W&B run."""
        return self._run is not None

    def _start_run(self, cfg: TrackingConfig, config: dict[str, Any]) -> Any:
        try:
            import wandb

            wandb_dir = self.state_dir / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)  # W&B needs it to exist
            if self.mode == "online" and not wandb.login(prompt=False, verify=False):
                # an explicit ``online`` with no key would stop here at W&B's login prompt
                print(
                    f"livetrain: tracking.wandb is online but W&B has no API key (set WANDB_API_KEY or run "
                    f"`wandb login`): logging offline in {wandb_dir}; `wandb sync` uploads it later",
                    file=sys.stderr,
                )
                self.mode = "offline"
            self.run_id = stable_run_id(self.state_dir)
            return wandb.init(
                dir=str(self.state_dir),  # W&B writes into <dir>/wandb
                mode=self.mode,
                project=cfg.project,
                name=cfg.run_name,
                config=config,
                id=self.run_id,
                resume="allow",
                reinit="create_new",
                # Leave stdout/stderr alone: the live view owns the terminal
                # and the final JSON line must be the last line on stdout.
                settings=wandb.Settings(console="off"),
            )
        except Exception as e:  # W&B is optional: never let it stop livetrain
            self._wandb_failed("could not start the run", e)
            return None

    def _wandb_failed(self, what: str, e: BaseException) -> None:
        self._run = None
        if not self._warned:
            self._warned = True
            print(
                f"livetrain: W&B {what} ({type(e).__name__}: {e}); "
                f"continuing with the local log {self.state_dir / METRICS_FILE}",
                file=sys.stderr,
            )

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=_jsonable)
        with self._lock:
            if not self._log.closed:
                self._log.write(line + "\n")

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record a set of metrics (at ``step``, if given)."""
        self._write({"t": time.time(), "step": step, **metrics})
        if self._run is not None:
            try:
                self._run.log(dict(metrics), step=step)
            except Exception as e:
                self._wandb_failed("log failed", e)

    def event(self, kind: str, **data: Any) -> None:
        """Record a discrete event (a promotion, a rollback, a drift alarm).

        Locally it is one line with ``"event": kind``; in W&B the numeric
        fields are logged as ``event/<kind>/<field>`` (attached to the next
        step) and the whole event becomes the summary entry ``event/<kind>``.
        """
        self._write({"t": time.time(), "event": kind, **data})
        if self._run is None:
            return
        numeric = {
            f"event/{kind}/{k}": v
            for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        try:
            if numeric:
                self._run.log(numeric, commit=False)
            self._run.summary[f"event/{kind}"] = json.loads(json.dumps(data, default=_jsonable))
        except Exception as e:
            self._wandb_failed("event failed", e)

    def log_model(self, version: int, file: str | os.PathLike | None, uri: str | None, metadata: dict[str, Any]) -> None:
        """Log served version ``version`` as a W&B model artifact ``model-<run id>``
        with aliases ``served`` and ``v<N>``.

        ``uri`` (the copy on object storage): logged as a reference, so W&B
        records where the weights are without uploading them again; else
        ``file`` is uploaded. Logging the same version again (a rollback to
        it) yields the same artifact version (same digest) and moves
        ``served`` back to it.
        """
        if self._run is None:
            return
        try:
            import wandb

            art = wandb.Artifact(f"model-{self.run_id}", type="model", metadata=json.loads(json.dumps(metadata, default=_jsonable)))
            if uri is not None:
                art.add_reference(uri, name="model.pt", checksum=False)  # versions are written once: the path is enough
            elif file is not None and Path(file).exists():
                art.add_file(str(file), name="model.pt")
            else:
                return
            self._run.log_artifact(art, aliases=["served", f"v{version}"])
        except Exception as e:  # e.g. no boto3 for an s3:// reference: metrics go on
            if not self._artifact_warned:
                self._artifact_warned = True
                print(f"livetrain: W&B model artifact for v{version} failed ({type(e).__name__}: {e}); "
                      "metrics are still logged", file=sys.stderr)

    def summary(self, d: dict[str, Any]) -> None:
        """Update the run's summary (final numbers shown in the W&B run table)."""
        if self._run is None:
            return
        try:
            self._run.summary.update(d)
        except Exception as e:
            self._wandb_failed("summary update failed", e)

    def close(self) -> None:
        """Finish the W&B run and close the local log. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as e:
                self._wandb_failed("finish failed", e)
        with self._lock:
            self._log.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
