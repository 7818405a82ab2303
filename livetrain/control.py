"""A running livetrain, seen from outside: ``livetrain status`` and ``livetrain stop``.

The pipeline starts one named actor, ``livetrain_control``, in its Ray
namespace, before anything else. Every tick it publishes its snapshot there
and reads back whether a stop was requested; ``livetrain status`` reads the
latest snapshot; ``livetrain stop`` sets the request and waits until the
pipeline has stopped (final checkpoint taken, summary written). The actor is
not detached: it dies with the driver, so a crashed livetrain leaves no stale
control behind, and a second livetrain in the same namespace is refused by
the name.

Works the same for ``livetrain run`` in a terminal and as a Ray job
(``ray job submit ... -- livetrain run ...``): status and stop only need the
cluster's address and livetrain's namespace.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

CONTROL_NAME = "livetrain_control"


class NotRunning(RuntimeError):
    """No Ray cluster, or no livetrain in it, where the command looked."""


class AlreadyRunning(RuntimeError):
    """A livetrain already runs in this namespace of this cluster."""


@ray.remote(num_cpus=0, max_concurrency=8)
class Control:
    """The latest snapshot and the stop request; threaded so ``wait_stopped`` can block."""

    def __init__(self, info: dict[str, Any]) -> None:
        self._info = info
        self._snapshot: dict[str, Any] = {}
        self._published_at: float | None = None
        self._stop_reason: str | None = None
        self._stopping = False
        self._stopped = threading.Event()

    def publish(self, snapshot: dict[str, Any]) -> str | None:
        """From the pipeline, every tick: store its figures; return the stop request, if any."""
        self._snapshot, self._published_at = snapshot, time.time()
        return self._stop_reason

    def stopping(self) -> None:
        """The pipeline is shutting down (Ctrl-C, SIGTERM, its duration, or a request)."""
        self._stopping = True

    def stopped(self, summary: dict[str, Any]) -> None:
        """The pipeline has stopped: trainers checkpointed, summary made."""
        self._snapshot, self._published_at = summary, time.time()
        self._stopped.set()

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason

    def stop_request(self) -> str | None:
        """The stop request, if any, for a pipeline that publishes nothing yet (starting)."""
        return self._stop_reason

    def wait_stopped(self, timeout_s: float) -> bool:
        return self._stopped.wait(timeout_s)

    def status(self) -> dict[str, Any]:
        """``state`` (starting, running, stopping, stopped), the run's identity, its figures."""
        if self._stopped.is_set():
            state = "stopped"
        elif self._stopping or self._stop_reason is not None:
            state = "stopping"
        else:
            state = "running" if self._published_at is not None else "starting"
        return {"state": state, "stop_requested": self._stop_reason, "updated_at": self._published_at,
                **self._info, **self._snapshot}


def job_submission_id() -> str | None:
    """The Ray job's submission id when this driver runs as one (``ray job submit``)."""
    try:  # the job supervisor hands the driver its job config, submission id included
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def start_control(namespace: str, info: dict[str, Any], scheduling_strategy: Any = None) -> Any:
    """The control actor of a new livetrain; ``AlreadyRunning`` if the namespace has one."""
    try:
        return Control.options(name=CONTROL_NAME, namespace=namespace,
                               scheduling_strategy=scheduling_strategy).remote(info)
    except ValueError as e:  # the name is taken
        raise AlreadyRunning(
            f"a livetrain is already running in Ray namespace {namespace!r} on this cluster; "
            f"stop it (`livetrain stop --namespace {namespace}`) or set another ray.namespace"
        ) from e


# --- the client side: livetrain status / stop / rollback ------------------------


@contextmanager
def connected(address: str, namespace: str) -> Iterator[None]:
    """``ray.init`` on the cluster at ``address`` for the block; ``NotRunning`` if none answers.

    A host:port nobody listens on is checked first: ``ray.init`` would retry it for minutes.
    """
    if address.startswith(("http://", "https://")):
        raise NotRunning(f"{address} is a dashboard (job API) URL; pass the cluster's address, "
                         "HOST:PORT of the head (6379 by default), or `auto` on a cluster node")
    if address in ("auto", "") and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        raise NotRunning(f"RAY_ADDRESS is the dashboard URL {os.environ['RAY_ADDRESS']} (for `ray job`); "
                         "pass --address HOST:PORT of the head's GCS (6379 by default)")
    if address not in ("auto", ""):
        _check_reachable(address)
    try:
        ray.init(address=address, namespace=namespace, configure_logging=False, log_to_driver=False)
    except ConnectionError as e:  # the cause says why, e.g. a missing auth token
        raise NotRunning(f"could not connect to the Ray cluster at {address}: {e.__cause__ or e}") from e
    try:
        yield
    finally:
        ray.shutdown()


def find_control(namespace: str) -> Any:
    try:
        return ray.get_actor(CONTROL_NAME, namespace=namespace)
    except ValueError as e:
        raise NotRunning(f"no livetrain is running in Ray namespace {namespace!r} on this cluster "
                         "(`livetrain run` sets it with ray.namespace)") from e


def read_status(namespace: str) -> dict[str, Any]:
    try:
        return ray.get(find_control(namespace).status.remote(), timeout=30)
    except ray.exceptions.RayActorError as e:
        raise NotRunning(f"the livetrain in Ray namespace {namespace!r} has just exited") from e


def request_stop(namespace: str, reason: str, timeout_s: float) -> bool:
    """Ask the livetrain to stop; True once it has stopped, False if still running after ``timeout_s``."""
    control = find_control(namespace)
    try:
        ray.get(control.request_stop.remote(reason), timeout=30)
        return ray.get(control.wait_stopped.remote(timeout_s), timeout=timeout_s + 30)
    except ray.exceptions.RayActorError:
        return True  # its driver exited while we waited: stopped too


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise NotRunning(f"--address must be HOST:PORT (or auto), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise NotRunning(f"no Ray cluster at {address} ({e.strerror or e})") from e
