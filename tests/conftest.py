"""Test tiers: plain unit tests need nothing; tests marked ``ray`` share ONE
Ray session (started on first use, shut down at the end of the run)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One real Ray for the whole test session.

    4 logical CPUs on a 2-core machine: two train workers take one each and
    the light actors take fractions (DESIGN.md, CPU accounting).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            namespace="livetrain-tests",
            log_to_driver=True,
            configure_logging=False,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """One HTTP port for every in-process pipeline: Serve's proxy keeps the
    port it was first started with for the whole Ray session."""
    from _util import free_port

    return free_port()


@pytest.fixture(scope="session")
def s3():
    """The endpoint of a real S3-compatible server (moto in server mode) on
    loopback, with a bucket ``livetrain-test``; AWS credentials in the env."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from _util import S3_ENV

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir("livetrain-test")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
