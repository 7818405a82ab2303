"""The Ray Serve deployment: FastAPI ingress, dynamic batching, in-place swaps.

::

    HTTP ─▶ ingress ─▶ ModelServer replica ─┬─ JSON rows ─▶ @serve.batch ─▶ one forward pass
   (HAProxy or             │                (one Loaded snapshot per batch)
    Serve's proxy)         ├─ Arrow/Parquet bulk, Accept: Arrow ─▶ forward pass in a thread
                           └─ ?version=N ─▶ PinnedVersions (registry.get_version)
        follower thread: registry.wait_for_version (long-poll) ─▶ fetch weights ─▶ swap Loaded

Each replica follows the registry itself (``versions.VersionFollower``): no
redeploy per version. A request (or a whole batch) reads the ``Loaded``
reference once, so it is answered entirely by one version and names it; in-flight
work finishes on the old weights while new requests get the new. A replica
loads the current version in its constructor, so replicas started later
(autoscaling, replacement) come up on it, and ``check_health`` fails a
replica that has no model once the registry serves one.
"""

# no `from __future__ import annotations`: Serve rebuilds the FastAPI routes in the
# replica from a by-value copy of this class, where string annotations do not resolve
import asyncio
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import ray
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from ray import serve

from livetrain.serving import bodies
from livetrain.serving.auth import AuthError, BearerAuth, token_digest
from livetrain.serving.deployment import replica_actor_options
from livetrain.serving.predictor import BadRequest, Loaded, answer_bytes, describe, replica_device
from livetrain.training.checkpoint import weights_from_bytes
from livetrain.serving.versions import PinnedVersions, VersionFollower, VersionGone
from livetrain.training.checkpoint import CheckpointError
from livetrain.training.registry import RollbackError

APP_NAME = "livetrain"
INLINE_ROWS = 256
"""Batches up to this many rows are predicted on the event loop; bigger ones
in a thread, so the replica keeps reading requests meanwhile."""


@dataclass(frozen=True)
class ReplicaSettings:
    """Everything a replica needs; built by ``start_serving`` from the config."""

    registry_name: str
    namespace: str
    features: list[str]
    classes: list[int]
    limits: bodies.Limits
    max_batch_size: int
    batch_wait_timeout_s: float
    pinned_versions: int
    token_digest: Optional[str] = None
    """SHA-256 of the bearer token (never the token); None: no auth."""
    num_gpus: float = 0.0
    """GPUs Ray gave each replica; > 0: predict on cuda."""


class PredictResponse(BaseModel):
    predictions: list[int]
    probabilities: list[list[float]]
    model_version: int = Field(description="The version that produced every row of this answer.")


class RollbackRequest(BaseModel):
    version: Optional[int] = Field(None, ge=1, description="Version to serve again (default: the one before the current).")
    reason: str = Field("requested over HTTP", max_length=500)


class ErrorBody(BaseModel):
    detail: str


ARROW_ANSWER = {
    200: {
        "description": "JSON (above), or with `Accept: application/vnd.apache.arrow.stream` an Arrow IPC stream: "
        "columns predictions, probabilities; model_version in the schema metadata",
        "content": {bodies.ARROW: {"schema": {"type": "string", "format": "binary"}}},
    }
}

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Unparseable body (malformed JSON, not Arrow/Parquet)",
        401: "Missing or wrong bearer token (when serve.auth_token_env is set)",
        404: "The pinned version is not available",
        413: "Body or row count over the configured limit",
        415: "Unsupported content type",
        422: "Well-formed but wrong: width, types, NaN/inf, no rows",
        503: "No model has been promoted yet",
    }.items()
}


def predict_body_openapi(features: list[str], max_instances: int) -> dict[str, Any]:
    """The request body of ``POST /predict`` as OpenAPI, for this schema's width."""
    d = len(features)
    number = {"type": "number"}
    row = {
        "anyOf": [
            {"type": "array", "items": number, "minItems": d, "maxItems": d, "title": "row as a list in schema order"},
            {"type": "object", "properties": {f: number for f in features}, "required": features, "additionalProperties": False, "title": "row keyed by feature name"},
        ]
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "content": {
            bodies.JSON: {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "properties": {"instances": {"type": "array", "items": row, "minItems": 1, "maxItems": max_instances}},
                },
                "example": {"instances": [[0.5] * d]},
            },
            bodies.ARROW: binary,
            bodies.PARQUET: binary,
        },
    }


app = FastAPI(
    title="livetrain",
    description="The freshest model that passed the gate. Every answer names its model_version.",
    openapi_url=None,  # served by ModelServer: the schema names this deployment's features
    docs_url=None,
    redoc_url=None,
)
_bearer = HTTPBearer(auto_error=False, description="Required when serve.auth_token_env is set.")
"""Documents the scheme in OpenAPI; the check itself is ``ModelServer._auth``."""


@app.exception_handler(BadRequest)
async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": str(exc)})


@app.exception_handler(AuthError)
async def _unauthorized(_: Request, exc: AuthError) -> JSONResponse:
    return JSONResponse(status_code=401, content={"detail": str(exc)}, headers={"WWW-Authenticate": "Bearer"})


@app.exception_handler(VersionGone)
async def _gone(_: Request, exc: VersionGone) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc)})


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks (query parameters, admin bodies) as one readable line."""
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(parts) or "invalid request"})


async def _read_body(request: Request, limits: bodies.Limits) -> bytes:
    """The body, refusing more than ``limits.max_body_bytes`` without reading it all."""
    bodies.check_length(request.headers.get("content-length"), limits)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limits.max_body_bytes:
            raise BadRequest(bodies.too_large_message(f"more than {limits.max_body_bytes}", limits), 413)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(logging_config={"enable_access_log": False})  # resources: replica_actor_options
@serve.ingress(app)
class ModelServer:
    def __init__(self, settings: ReplicaSettings) -> None:
        torch.set_num_threads(1)
        self._s = settings
        self._auth = BearerAuth(settings.token_digest)
        self._registry = ray.get_actor(settings.registry_name, namespace=settings.namespace)
        device = replica_device(settings.num_gpus, torch.cuda.is_available())
        fetch = lambda ref: weights_from_bytes(ray.get(ref, timeout=60))  # noqa: E731  (.npz, no pickle)
        self._follower = VersionFollower(
            lambda have, timeout_s: ray.get(self._registry.wait_for_version.remote(have, timeout_s), timeout=timeout_s + 30),
            fetch,
            device=device,
        )
        self._pinned = PinnedVersions(
            lambda v: ray.get(self._registry.get_version.remote(v), timeout=30), fetch, settings.pinned_versions, device=device
        )
        self._predict_batch.set_max_batch_size(settings.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._answered: set[int] = set()
        self.batches = 0
        self.batched_requests = 0
        try:
            self._follower.step(0.0)  # come up on the current version, if there is one
        except Exception as e:  # the follower thread retries; check_health reports a replica left without a model
            print(f"livetrain: could not load the current version at start: {e!r}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follower.run, args=(self._stop,), name="livetrain-follow", daemon=True)
        self._thread.start()
        self._openapi: Optional[dict[str, Any]] = None

    # --- the API ---------------------------------------------------------------

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={**ERRORS, **ARROW_ANSWER},
        dependencies=[Depends(_bearer)],
        openapi_extra={"requestBody": predict_body_openapi(["feature_0", "feature_1"], 10_000)},  # per deployment: openapi()
        summary="Score rows with the served model (or a pinned version)",
    )
    async def predict(
        self,
        request: Request,
        version: Optional[int] = Query(None, ge=1, description="Answer with this version (debugging, A/B); 404 if gone."),
    ) -> Response:
        headers = request.headers
        self._auth.check(headers.get("authorization"))
        kind = bodies.media_type(headers.get("content-type"))  # 415 before reading the body
        answer_type = bodies.answer_type(headers.get("accept"))
        raw = await _read_body(request, self._s.limits)
        if len(raw) > 65_536:  # parsing a big body would stall the event loop
            x = await asyncio.to_thread(bodies.decode, raw, kind, self._s.features, self._s.limits)
        else:
            x = bodies.decode(raw, kind, self._s.features, self._s.limits)
        if kind == bodies.JSON and version is None and answer_type == bodies.JSON:
            answer = await self._predict_batch(x)  # small requests: batched with others
        else:  # bulk rows are a batch already; pinned and Arrow answers are per request
            loaded = await self._loaded(version)
            if loaded is None:
                answer = None
            elif answer_type == bodies.ARROW:
                answer = loaded.version, await asyncio.to_thread(self._arrow, loaded, x)
            else:
                answer = (await asyncio.to_thread(self._answer, loaded, [x]))[0]
        if isinstance(answer, BadRequest):  # rows the model could not score (predict_many)
            raise answer
        if answer is None:
            return JSONResponse(status_code=503, content={"detail": "no model has been promoted yet"}, headers={"Retry-After": "1"})
        v, payload = answer
        self._note_answer(v)
        return Response(payload, media_type=answer_type, headers={"x-model-version": str(v)})

    @app.get("/model", summary="The served version: lineage, data age, metrics on unseen data")
    async def model(self) -> dict[str, Any]:
        out = describe(self._follower.current)
        try:  # the registry's live, test-then-train figures of whatever is served
            out["live"] = await asyncio.wait_for(self._registry.live_report.remote(), timeout=2.0)
        except Exception:  # registry busy or restarting: the static part still answers
            out["live"] = None
        return out

    @app.get("/healthz", summary="This replica's health (503 when it has no model but the registry has one)")
    def healthz(self) -> JSONResponse:
        f = self._follower
        problem = self._health_problem()
        body = {
            "ok": problem is None,
            "detail": problem,
            "model_version": f.current.version if f.current else None,
            "registry_version": f.announced,
            "swaps": f.swaps,
            "last_error": f.last_error,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "pinned_loads": self._pinned.loads,
            "replica_pid": os.getpid(),
        }
        return JSONResponse(status_code=200 if problem is None else 503, content=body)

    @app.post("/admin/rollback", responses=ERRORS, dependencies=[Depends(_bearer)], summary="Serve an earlier version again")
    async def rollback(self, request: Request, body: RollbackRequest) -> JSONResponse:
        self._auth.check(request.headers.get("authorization"))
        try:
            d = await self._registry.rollback.remote(body.version, body.reason)
        except RollbackError as e:  # raised in the registry, re-raised here as a RayTaskError subclass
            return JSONResponse(status_code=409, content={"detail": str(getattr(e, "cause", e))})
        return JSONResponse(content={"action": d.action, "version": d.version, "reason": d.reason, "previous": d.served_version})

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> dict[str, Any]:
        if self._openapi is None:
            schema = request.app.openapi()
            predict = schema["paths"]["/predict"]["post"]
            predict["requestBody"] = predict_body_openapi(self._s.features, self._s.limits.max_instances)
            self._openapi = schema
        return self._openapi

    @app.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="livetrain")

    # --- Serve hooks -----------------------------------------------------------

    def check_health(self) -> None:
        problem = self._health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # --- internals -------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, xs: list[np.ndarray]) -> list[Optional[Union[tuple[int, bytes], BadRequest]]]:
        loaded = self._follower.current  # ONE snapshot: the whole batch comes from this version
        if loaded is None:
            return [None] * len(xs)
        self.batches += 1
        self.batched_requests += len(xs)
        if sum(len(x) for x in xs) <= INLINE_ROWS:
            return self._answer(loaded, xs)
        return await asyncio.to_thread(self._answer, loaded, xs)

    def _answer(self, loaded: Loaded, xs: list[np.ndarray]) -> list[Union[tuple[int, bytes], BadRequest]]:
        """Per request: (version, JSON body), or its refusal (returned, not raised: the
        other requests of a batch are answered)."""
        answers = loaded.predict_many(xs, self._s.classes)
        return [a if isinstance(a, BadRequest) else (loaded.version, answer_bytes(a)) for a in answers]

    def _arrow(self, loaded: Loaded, x: np.ndarray) -> bytes:
        return bodies.encode_arrow(*loaded.scores(x, self._s.classes), loaded.version)

    async def _loaded(self, version: Optional[int]) -> Optional[Loaded]:
        """The served version (None before the first promotion), or the pinned one."""
        current = self._follower.current
        if version is None or (current is not None and current.version == version):
            return current
        try:
            return await asyncio.to_thread(self._pinned.get, version)
        except CheckpointError as e:
            raise BadRequest(f"model version {version} cannot be loaded: {e}", 409) from None

    def _note_answer(self, version: int) -> None:
        if version not in self._answered:  # freshness: the first answer from each version
            self._answered.add(version)
            self._registry.record_answer.remote(version, time.time())

    def _health_problem(self) -> Optional[str]:
        if not self._thread.is_alive():
            return "the version follower thread died"
        return self._follower.health_problem()


def start_serving(cfg, registry_name: str, namespace: str, feature_names: list[str], *, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve on ``cfg.serve.host:port`` and deploy the app; returns its URL."""
    s = cfg.serve
    settings = ReplicaSettings(
        registry_name=registry_name,
        namespace=namespace,
        features=list(feature_names),
        classes=list(cfg.schema.classes),
        limits=bodies.Limits(s.max_instances, s.max_bulk_rows, s.max_body_bytes),
        max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        pinned_versions=s.pinned_versions,
        token_digest=token_digest(s.auth_token_env),
        num_gpus=s.num_gpus,
    )
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(
        ModelServer.options(
            num_replicas=s.num_replicas,
            max_ongoing_requests=s.max_ongoing_requests,
            ray_actor_options=replica_actor_options(s),
            health_check_period_s=s.health_check_period_s,
        ).bind(settings),
        name=name,
        route_prefix=route_prefix,
        blocking=False,
    )
    return f"http://{s.host}:{s.port}" + ("" if route_prefix == "/" else route_prefix)
