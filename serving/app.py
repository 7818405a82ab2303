"""The Ray Serve deployment: FastAPI ingress, in-place version swaps.

Each replica runs a follower thread that long-polls the registry
(``wait_for_version``), fetches the promoted weights from the object store
and swaps one ``Loaded`` reference. A request reads that reference once, so
it is answered entirely by one version, and in-flight requests finish on the
old weights while new ones get the new. No redeploy per version.
"""

import threading
import time
from typing import Annotated, Any, Optional, Union

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from livetrain.serving.predictor import BadRequest, Loaded, describe, instances_to_array
from livetrain.training.checkpoint import model_from_weights

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class PredictRequest(BaseModel):
    instances: list[Union[list[Number], dict[str, Number]]] = Field(
        ...,
        description="Rows to score: lists of feature values in schema order, or objects keyed by feature name.",
        examples=[[[0.1, 0.2, 0.3]]],
    )


class PredictResponse(BaseModel):
    predictions: list[int]
    probabilities: list[list[float]]
    model_version: int


app = FastAPI(
    title="livetrain",
    description="The freshest model that passed the gate. Every answer names its model_version.",
)


@app.exception_handler(BadRequest)
async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(exc)})


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=64,
    logging_config={"enable_access_log": False},
)
@serve.ingress(app)
class ModelServer:
    def __init__(
        self,
        registry_name: str,
        namespace: str,
        feature_names: list[str],
        classes: list[int],
        max_instances: int,
    ) -> None:
        torch.set_num_threads(1)
        self._registry = ray.get_actor(registry_name, namespace=namespace)
        self._features = feature_names
        self._classes = classes
        self._max_instances = max_instances
        self._loaded: Optional[Loaded] = None
        self._answered: set[int] = set()
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="livetrain-follow", daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            have = self._loaded.served.version if self._loaded else -1
            try:
                served = ray.get(self._registry.wait_for_version.remote(have, 5.0))
                if served is None:
                    continue
                model = model_from_weights(served.spec, ray.get(served.weights))
            except Exception as e:  # registry restarting, weights gone: keep serving what we have
                print(f"livetrain: follower could not load a new version: {e!r}")
                self._stop.wait(1.0)
                continue
            self._loaded = Loaded(served, model, time.time())

    @app.post("/predict", response_model=PredictResponse)
    def predict(self, body: PredictRequest) -> dict[str, Any]:
        loaded = self._loaded  # read once: the whole answer comes from this version
        if loaded is None:
            return JSONResponse(status_code=503, content={"detail": "no model has been promoted yet"})
        x = instances_to_array(body.instances, self._features, self._max_instances)
        out = loaded.predict(x, self._classes)
        v = loaded.served.version
        if v not in self._answered:
            self._answered.add(v)
            self._registry.record_answer.remote(v, time.time())
        return out

    @app.get("/model")
    def model(self) -> dict[str, Any]:
        return describe(self._loaded)

    @app.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"ok": True, "model_version": self._loaded.served.version if self._loaded else None}

    def check_health(self) -> None:
        if not self._follower.is_alive():
            raise RuntimeError("version follower thread died")

    def __del__(self) -> None:
        self._stop.set()


APP_NAME = "livetrain"


def start_serving(cfg, registry_name: str, namespace: str, feature_names: list[str]) -> str:
    """Start Serve on ``cfg.serve.host:port`` and deploy the app; returns its URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(
        ModelServer.options(num_replicas=cfg.serve.num_replicas).bind(
            registry_name, namespace, feature_names, list(cfg.schema.classes), cfg.serve.max_instances
        ),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )
    return f"http://{cfg.serve.host}:{cfg.serve.port}"
