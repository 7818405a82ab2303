"""The serving endpoint for real: a ModelRegistry actor, Ray Serve over HTTP,
versions promoted by hand (``Promoter``: propose, then unseen rows for the gate).

One app serves the module; a second one (bearer token, started after
promotions) checks auth and that late replicas come up on the current version.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from _util import arrow_bytes, http, parquet_bytes, wait_until
from livetrain.config import load_config, shipped_config
from livetrain.messages import BlockMeta, BlockRef, Candidate, ModelSpec
from livetrain.training.checkpoint import model_from_weights, state_dict_numpy
from livetrain.training.models import build_model

pytestmark = [pytest.mark.ray, pytest.mark.serve]

FEATURES = ["x0", "x1", "x2"]
SPEC = ModelSpec("mlp", {"num_features": 3, "num_classes": 2, "hidden": [16]})
REGISTRY = "livetrain_serving_test_registry"
TOKEN_ENV = "LIVETRAIN_TEST_SERVE_TOKEN"


class Promoter:
    """Drives the real registry: propose weights, then feed one block of rows
    newer than them so the gate (tolerance 1: anything passes) decides."""

    def __init__(self, registry, spec: ModelSpec = SPEC, rows: int = 20) -> None:
        self.registry, self.spec, self.rows = registry, spec, rows
        self.seq = 0
        self.weights: dict[int, dict[str, np.ndarray]] = {}
        self._rng = np.random.default_rng(0)

    def promote(self, seed: int | None = None, w: dict[str, np.ndarray] | None = None) -> int:
        import ray

        if w is None:
            torch.manual_seed(seed if seed is not None else self.seq + 1000)
            w = state_dict_numpy(build_model(self.spec))
        now = time.time()
        cand = Candidate(ray.put(w), self.spec, self.seq, now, self.seq, now, 0.0)
        version = ray.get(self.registry.propose.remote(cand))
        self.seq += 1
        x = self._rng.random((self.rows, self.spec.kwargs["num_features"]), dtype=np.float32)
        meta = BlockMeta(f"shard-{self.seq}", self.seq, self.rows, x.nbytes, now, now)
        ray.get(self.registry.observe.remote(meta, BlockRef(ray.put({"x": x, "y": (x[:, 0] > 0.5).astype(np.int64)}))))
        info = ray.get(self.registry.served_info.remote())
        assert info["model_version"] == version, f"v{version} was not promoted: {info}"
        self.weights[version] = w
        return version

    def expected(self, version: int, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model_from_weights(self.spec, self.weights[version])(torch.from_numpy(x)), 1).numpy()


def start_registry(cfg, name: str, namespace: str):
    from livetrain.training.registry_actor import ModelRegistry

    return ModelRegistry.options(name=name, namespace=namespace).remote(cfg.gate, len(cfg.schema.classes), cfg.state_dir)


def serving_config(state_dir, port: int, *extra: str):
    return load_config(
        shipped_config("demo"),
        [
            f"state_dir={state_dir}",
            f"serve.port={port}",
            "gate.tolerance=1.0",
            "gate.min_eval_rows=10",
            "serve.max_batch_size=16",
            "serve.batch_wait_timeout_s=0.01",
            "serve.max_body_bytes=1000000",
            "serve.max_instances=1000",
            "serve.max_bulk_rows=20000",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def app(ray_session, serve_port, tmp_path_factory):
    import ray
    from ray import serve

    from livetrain.serving.app import start_serving

    cfg = serving_config(tmp_path_factory.mktemp("serving"), serve_port)
    ns = ray.get_runtime_context().namespace
    registry = start_registry(cfg, REGISTRY, ns)
    url = start_serving(cfg, REGISTRY, ns, FEATURES, name="serving-test")
    yield url, Promoter(registry), registry
    serve.delete("serving-test")
    ray.kill(registry)


def healthz(url: str) -> dict[str, Any]:
    return http("GET", url + "/healthz")[1]


def served_by_replica(url: str, version: int) -> None:
    wait_until(lambda: healthz(url).get("model_version") == version, 30, f"the replica to serve v{version}")


ROWS = np.random.default_rng(1).random((4, 3), dtype=np.float32)


def test_answers_before_the_first_promotion_are_503_and_the_replica_is_healthy(app):
    url, promoter, _ = app
    if promoter.weights:
        pytest.skip("a version was promoted already")
    status, body = http("POST", url + "/predict", {"instances": ROWS.tolist()})
    assert status == 503 and "no model" in body["detail"], body
    assert http("GET", url + "/healthz")[0] == 200


def test_predict_names_the_version_and_answers_with_its_weights(app):
    url, promoter, _ = app
    v = promoter.promote()
    served_by_replica(url, v)
    status, body = http("POST", url + "/predict", {"instances": ROWS.tolist()})
    assert status == 200 and body["model_version"] == v
    assert np.allclose(body["probabilities"], promoter.expected(v, ROWS), atol=1e-5)
    as_objects = [dict(zip(FEATURES, r)) for r in ROWS.tolist()]
    assert http("POST", url + "/predict", {"instances": as_objects})[1]["probabilities"] == body["probabilities"]


def test_under_concurrent_load_with_promotions_and_a_rollback_every_answer_is_one_version(app):
    """Batches form, versions change underneath, and each response still
    matches exactly the weights of the version it names: no mixed batch."""
    url, promoter, _ = app
    v0 = promoter.promote()
    served_by_replica(url, v0)
    before = healthz(url)
    answers: list[tuple[np.ndarray, dict]] = []
    failures: list[Any] = []
    stop = threading.Event()

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        while not stop.is_set():
            x = rng.random((int(rng.integers(1, 5)), 3), dtype=np.float32)
            status, body = http("POST", url + "/predict", {"instances": x.tolist()})
            (answers.append((x, body)) if status == 200 else failures.append((status, body)))

    with ThreadPoolExecutor(12) as pool:
        for i in range(12):
            pool.submit(client, i)
        try:
            wait_until(lambda: len(answers) >= 24, 30, f"answers from v{v0}")
            versions = [v0]
            for _ in range(3):
                versions.append(promoter.promote())
                wait_until(lambda: {b["model_version"] for _, b in answers[-24:]} == {versions[-1]}, 30, f"answers from v{versions[-1]}")
            status, body = http("POST", url + "/admin/rollback", {"reason": "test"})
            assert status == 200 and body["version"] == versions[-2], body
            wait_until(lambda: {b["model_version"] for _, b in answers[-24:]} == {versions[-2]}, 30, "answers after the rollback")
        finally:
            stop.set()
    assert failures == []
    seen = {b["model_version"] for _, b in answers}
    assert seen == set(versions), seen
    for x, body in answers:
        assert np.allclose(body["probabilities"], promoter.expected(body["model_version"], x), atol=1e-5)
    after = healthz(url)
    batches = after["batches"] - before["batches"]
    requests = after["batched_requests"] - before["batched_requests"]
    assert requests == len(answers) and batches < requests, "requests were not batched"


BAD = [
    ("wrong width", {"instances": [[0.1, 0.2]]}, None, "application/json", 422, "has 2 features, expected 3"),
    ("wrong type", {"instances": [[0.1, "a", 0.3]]}, None, "application/json", 422, "is not a number"),
    ("null", {"instances": [[0.1, None, 0.3]]}, None, "application/json", 422, "is not a number"),
    ("nan", None, b'{"instances": [[0.1, NaN, 0.3]]}', "application/json", 422, "not finite"),
    ("inf", None, b'{"instances": [[0.1, -Infinity, 0.3]]}', "application/json", 422, "not finite"),
    ("empty list", {"instances": []}, None, "application/json", 422, "empty"),
    ("no instances", {}, None, "application/json", 422, "'instances' is missing"),
    ("unknown feature", {"instances": [{"x0": 1, "x1": 2, "x3": 3}]}, None, "application/json", 422, "unknown features"),
    ("too many rows", {"instances": [[0.1, 0.2, 0.3]] * 1001}, None, "application/json", 413, "too many instances"),
    ("oversized body", None, b'{"instances": [' + b" " * 1_000_001 + b"]}", "application/json", 413, "serve.max_body_bytes"),
    ("malformed json", None, b"{not json", "application/json", 400, "malformed JSON"),
    ("empty body", None, b"", "application/json", 400, "empty body"),
    ("wrong content type", None, b"x0=1", "application/x-www-form-urlencoded", 415, "unsupported content type"),
    ("text body", None, b"0.1,0.2,0.3", "text/csv", 415, "text/csv"),
    ("garbage arrow", None, b"\x00" * 64, "application/vnd.apache.arrow.stream", 400, "not a readable Arrow"),
    ("garbage parquet", None, b"PAR1xxxxPAR1", "application/x-parquet", 400, "not a readable Parquet"),
]


@pytest.mark.parametrize("name, body, raw, ctype, status, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_problem_and_serving_continues(app, name, body, raw, ctype, status, fragment):
    url, promoter, _ = app
    if not promoter.weights:
        served_by_replica(url, promoter.promote())
    got, answer = http("POST", url + "/predict", body, raw=raw, ctype=ctype)
    assert got == status, answer
    assert fragment.lower() in answer["detail"].lower(), answer
    assert http("POST", url + "/predict", {"instances": [[0.1, 0.2, 0.3]]})[0] == 200


def test_rows_the_model_overflows_on_are_a_422_naming_them_never_nan_in_a_200(app):
    url, promoter, _ = app
    torch.manual_seed(5)
    w = state_dict_numpy(build_model(SPEC))
    w["net.0.running_var"] = np.full_like(w["net.0.running_var"], 0.25)  # features of std 0.5
    v = promoter.promote(w=w)
    served_by_replica(url, v)
    rows = [[0.1, 0.2, 0.3], [3e38, 0.2, 0.3]]  # finite float32: inf once standardised
    for path in ("/predict", f"/predict?version={v}"):  # batched, and answered alone
        status, body = http("POST", url + path, {"instances": rows})
        assert status == 422 and "rows [1]" in body["detail"], body
    assert http("POST", url + "/predict", {"instances": rows[:1]})[0] == 200


def test_bad_query_and_admin_bodies_are_422_with_a_readable_detail(app):
    url, _, _ = app
    status, body = http("POST", url + "/predict?version=abc", {"instances": [[0.1, 0.2, 0.3]]})
    assert status == 422 and "version" in body["detail"]
    status, body = http("POST", url + "/admin/rollback", {"version": "latest"})
    assert status == 422 and "version" in body["detail"]
    status, body = http("POST", url + "/admin/rollback", {"version": 10_000})
    assert status == 409 and "v10000" in body["detail"]


def test_pinned_version_answers_from_that_version_and_404_when_gone(app):
    url, promoter, _ = app
    old = promoter.promote()
    new = promoter.promote()
    served_by_replica(url, new)
    status, body = http("POST", url + f"/predict?version={old}", {"instances": ROWS.tolist()})
    assert status == 200 and body["model_version"] == old
    assert np.allclose(body["probabilities"], promoter.expected(old, ROWS), atol=1e-5)
    assert http("POST", url + "/predict", {"instances": ROWS.tolist()})[1]["model_version"] == new
    status, body = http("POST", url + "/predict?version=9999", {"instances": ROWS.tolist()})
    assert status == 404 and "9999" in body["detail"]


def test_bulk_arrow_and_parquet_bodies_answer_every_row(app):
    url, promoter, _ = app
    v = healthz(url)["model_version"] or promoter.promote()
    served_by_replica(url, v)
    x = np.random.default_rng(2).random((5000, 3), dtype=np.float32)
    table = pa.table({f: x[:, j] for j, f in enumerate(FEATURES)})
    for raw, ctype in ((arrow_bytes(table), "application/vnd.apache.arrow.stream"), (parquet_bytes(table), "application/x-parquet")):
        status, body = http("POST", url + "/predict", raw=raw, ctype=ctype)
        assert status == 200, body
        assert body["model_version"] == v and len(body["predictions"]) == 5000
        assert np.allclose(body["probabilities"], promoter.expected(v, x), atol=1e-5)


def test_bulk_answers_come_as_arrow_when_the_client_accepts_arrow(app):
    import urllib.request

    url, promoter, _ = app
    v = healthz(url)["model_version"] or promoter.promote()
    served_by_replica(url, v)
    x = np.random.default_rng(3).random((3000, 3), dtype=np.float32)
    body = arrow_bytes(pa.table({f: x[:, j] for j, f in enumerate(FEATURES)}))
    headers = {"content-type": "application/vnd.apache.arrow.stream", "accept": "application/vnd.apache.arrow.stream"}
    with urllib.request.urlopen(urllib.request.Request(url + "/predict", data=body, headers=headers), timeout=30) as r:
        assert r.headers["content-type"] == "application/vnd.apache.arrow.stream" and r.headers["x-model-version"] == str(v)
        with pa.ipc.open_stream(r.read()) as reader:
            table = reader.read_all()
    assert table.num_rows == 3000 and table.schema.metadata[b"model_version"] == str(v).encode()
    expected = promoter.expected(v, x)
    assert np.allclose(np.array(table.column("probabilities").to_pylist()), expected, atol=1e-5)
    assert table.column("predictions").to_pylist() == expected.argmax(1).tolist()


def test_a_late_replica_comes_up_on_the_current_version_and_requires_the_token(app, serve_port, tmp_path):
    import ray
    from ray import serve

    from livetrain.serving.app import start_serving

    url, promoter, _ = app
    v = promoter.promote()
    os.environ[TOKEN_ENV] = "t0k3n"
    cfg = serving_config(tmp_path, serve_port, f"serve.auth_token_env={TOKEN_ENV}")
    late = start_serving(cfg, REGISTRY, ray.get_runtime_context().namespace, FEATURES, name="serving-late", route_prefix="/late")
    try:
        assert healthz(late)["model_version"] == v, "the new replica did not start on the current version"
        body = json.dumps({"instances": ROWS.tolist()}).encode()
        status, answer = http("POST", late + "/predict", raw=body)
        assert status == 401 and "bearer" in answer["detail"].lower()
        status, answer = _post_with_token(late + "/predict", body, "wrong")
        assert status == 401 and "wrong" in answer["detail"]
        status, answer = _post_with_token(late + "/predict", body, "t0k3n")
        assert status == 200 and answer["model_version"] == v
        assert http("POST", late + "/admin/rollback", {})[0] == 401
        assert http("GET", late + "/model")[1]["model_version"] == v, "/model stays open"
    finally:
        serve.delete("serving-late")
        os.environ.pop(TOKEN_ENV, None)


def _post_with_token(url: str, raw: bytes, token: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=raw, method="POST", headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


FUZZ_EXAMPLES = 60
"""Per generation mode; with two modes and three operations this stays well under a minute."""


def test_fuzzing_from_the_openapi_schema_finds_no_server_error(app):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    url, promoter, _ = app
    if not promoter.weights:
        served_by_replica(url, promoter.promote())
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    assert "/predict" in schema.raw_schema["paths"] and "x2" in json.dumps(schema.raw_schema["paths"]["/predict"])
    errors: list[str] = []
    counts = {"calls": 0, "ok": 0}

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            response = case.call(base_url=url, timeout=10)
            counts["calls"] += 1
            counts["ok"] += response.status_code < 400
            if response.status_code >= 500:
                errors.append(f"{case.method} {case.path} {case.media_type} -> {response.status_code}: {response.text[:200]}")

        fuzz()
    assert errors == [], errors[:5]
    assert counts["calls"] >= FUZZ_EXAMPLES and counts["ok"] > 0
    assert http("POST", url + "/predict", {"instances": [[0.1, 0.2, 0.3]]})[0] == 200
    status, page = http_text(url + "/docs")
    assert status == 200 and "/openapi.json" in page


def http_text(url: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def test_a_restarted_registry_comes_back_with_the_versions_served_before(ray_session, tmp_path):
    """Killed and restarted, the registry serves its last version and still knows the
    ones served before it: ``rollback`` (no version) goes back to the one before,
    and the gate keeps comparing candidates with them."""
    import ray

    cfg = serving_config(tmp_path, 8000)  # no HTTP here: the registry alone
    registry = start_registry(cfg, "livetrain_restarted_registry", "livetrain-tests")
    promoter = Promoter(registry)
    versions = [promoter.promote() for _ in range(3)]
    first = ray.get(registry.__ray_call__.remote(lambda r: r.instance))
    ray.kill(registry, no_restart=False)
    wait_until(lambda: ray.get(registry.__ray_call__.remote(lambda r: r.instance), timeout=60) != first, 60,
               "the restarted registry")
    assert ray.get(registry.served_info.remote())["model_version"] == versions[-1]
    assert ray.get(registry.__ray_call__.remote(lambda r: [v.version for v in r._reg.history])) == versions
    assert ray.get(registry.__ray_call__.remote(lambda r: r._reg.previous.version)) == versions[-2]
    decision = ray.get(registry.rollback.remote())
    assert (decision.action, decision.version) == ("rollback", versions[-2])
    ray.kill(registry)
