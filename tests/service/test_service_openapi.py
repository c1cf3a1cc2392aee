"""What /openapi.json declares (issue 14, item 7), read from the live server: the bearer schemes and
which routes need which; the error answers every kind of route declares, each with the JSON error
body and its headers; the constraints the API checks by hand (budget, path ids, the upload's parts),
each also answered as the schema says; and a 405's `Allow` header naming every method of the path.
tests/service/test_schemathesis.py then checks the server's answers against all of it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.service.svc_helpers import auth
from worker.service.jobstore import is_valid_id, new_id

ERROR_REF = "#/components/schemas/ErrorBody"


def _operations(spec: dict) -> Iterator[tuple[str, str, dict]]:
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield method.upper(), path, op


def test_the_bearer_schemes_and_who_needs_them(spec):
    schemes = spec["components"]["securitySchemes"]
    assert {name: (s["type"], s["scheme"]) for name, s in schemes.items()} == {
        "apiKey": ("http", "bearer"), "metricsToken": ("http", "bearer"), "metricsAdminToken": ("http", "bearer")}
    security = {(m, p): op.get("security") for m, p, op in _operations(spec)}
    tenant_routes = [k for k in security if k[1].startswith("/v1/")]
    assert len(tenant_routes) >= 15
    assert all(security[k] == [{"apiKey": []}] for k in tenant_routes), security
    assert security[("GET", "/metrics")] == [{"metricsToken": []}, {"metricsAdminToken": []}]  # either
    assert security[("GET", "/readyz")] == [{}, {"apiKey": []}, {"metricsToken": []},
                                            {"metricsAdminToken": []}]  # optional: anyone
    assert security[("GET", "/healthz")] is None


def test_every_error_answer_is_the_json_error_body(spec):
    errors = [(m, p, code, r) for m, p, op in _operations(spec) for code, r in op["responses"].items()
              if code >= "400"]
    assert len(errors) >= 70
    for m, p, code, r in errors:
        assert r["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}, (m, p, code, r)
    # FastAPI's own 422 body (detail: [...]) is declared nowhere: the API never sends it.
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])


def test_the_codes_of_each_kind_of_route(spec):
    codes = {(m, p): set(op["responses"]) for m, p, op in _operations(spec)}
    every = {"401", "422", "503"}
    upload = every | {"202", "400", "408", "413", "415", "429"}
    download = every | {"200", "404", "409"}
    assert codes[("POST", "/v1/datasets")] == upload
    assert codes[("POST", "/v1/datasets/{dataset_id}/versions")] == upload | {"404", "409"}
    assert codes[("GET", "/v1/datasets")] == codes[("GET", "/v1/jobs")] == every | {"200"}
    assert codes[("GET", "/v1/datasets/{dataset_id}")] == codes[("GET", "/v1/jobs/{job_id}")] == every | {"200", "404"}
    assert codes[("GET", "/v1/jobs/{job_id}/events")] == every | {"200", "404"}
    assert codes[("DELETE", "/v1/datasets/{dataset_id}")] == every | {"204", "404", "409"}
    assert codes[("POST", "/v1/prune")] == every | {"200", "202", "404", "409", "429"}
    assert codes[("POST", "/v1/jobs/{job_id}/cancel")] == every | {"202", "404", "409"}
    for name in ("selection", "scores", "diagnostics", "bigrec_train.jsonl", "adapter"):
        assert codes[("GET", f"/v1/jobs/{{job_id}}/{name}")] == download, name
    assert codes[("GET", "/readyz")] == {"200", "503"}
    assert codes[("GET", "/metrics")] == {"200", "401", "404"}


def test_the_headers_that_come_with_an_answer(spec):
    for m, p, op in _operations(spec):
        responses = op["responses"]
        for code, header in (("401", "WWW-Authenticate"), ("429", "Retry-After"), ("503", "Retry-After")):
            if code in responses and not (p == "/readyz" and code == "503"):
                assert header in responses[code].get("headers", {}), (m, p, code)
    prune = spec["paths"]["/v1/prune"]["post"]["responses"]
    assert "Location" in prune["202"]["headers"] and {"Location", "Idempotent-Replayed"} <= set(prune["200"]["headers"])
    # 429 (the tenant's limits) on every route that uploads a dataset or starts a job, and no other
    assert {(m, p) for m, p, op in _operations(spec) if "429" in op["responses"]} == {
        ("POST", "/v1/datasets"), ("POST", "/v1/datasets/{dataset_id}/versions"), ("POST", "/v1/prune")}


def test_the_path_ids_have_the_shape_of_new_ids(spec):
    import re

    params = [(p, prm["name"], prm["schema"]["pattern"]) for m, p, op in _operations(spec)
              for prm in op.get("parameters", ()) if prm["in"] == "path"]
    assert {name for _, name, _ in params} == {"dataset_id", "job_id"}
    for path, name, pattern in params:
        kind = name.removesuffix("_id").replace("dataset", "ds")
        assert re.fullmatch(pattern, new_id(kind)) and is_valid_id(kind, new_id(kind)), (path, name, pattern)
        assert not re.fullmatch(pattern, new_id("job" if kind == "ds" else "ds"))


def test_a_malformed_id_is_404_as_the_schema_allows(http):
    for url in ("/v1/datasets/ds_0", "/v1/jobs/nope/events", "/v1/jobs/JOB_0000000000000000000000"):
        r = http.get(url, headers=auth("acme"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (url, r.text)


def _prune_budget(http: httpx.Client, budget: object) -> httpx.Response:
    body = json.dumps({"dataset_id": "ds_0000000000000000000000", "budget": budget})
    return http.post("/v1/prune", content=body, headers={**auth("acme"), "Content-Type": "application/json"})


def test_the_budget_schema_is_what_the_api_accepts(spec, http):
    budget = spec["components"]["schemas"]["PruneRequest"]["properties"]["budget"]
    assert (budget["type"], budget["exclusiveMinimum"], budget["maximum"]) == ("number", 0, 10**9)
    assert budget["anyOf"] == [{"type": "integer"}, {"exclusiveMaximum": 1}]  # a whole count, or a ratio < 1
    # Inside the schema: past validation (the dataset does not exist: 404)
    for ok in (1, 64, 64.0, 10**9, 0.02, 0.999):
        assert _prune_budget(http, ok).status_code == 404, ok
    # Outside it: 422 on `budget`
    for bad in (0, -1, 1.5, 64.5, 10**9 + 1, 1.0e10, "64", True):
        r = _prune_budget(http, bad)
        assert r.status_code == 422 and r.json()["error"]["field"] == "budget", (bad, r.text)


def test_the_upload_body_is_what_the_api_accepts(spec, http, settings):
    body = spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["additionalProperties"] is False and body["required"] == ["files"]
    assert body["properties"]["files"]["minItems"] == 1
    # this server's DEALREC_MAX_UPLOAD_FILES (test_service_limits.py: a server with another value says it)
    assert body["properties"]["files"]["maxItems"] == settings.max_upload_files
    assert ".parquet" in body["properties"]["files"]["description"]
    # another field beside `files`, or no file at all: 400, as additionalProperties and minItems say
    other = http.post("/v1/datasets", headers=auth("acme"), data={"note": "x"},
                      files=[("files", ("items.tsv", b"item_id\ttitle\n1\ta\n", "text/plain"))])
    assert other.status_code == 400 and "unexpected form field" in other.json()["error"]["message"], other.text
    none = http.post("/v1/datasets", headers={**auth("acme"), "Content-Type": "multipart/form-data; boundary=b"},
                     content=b"--b--\r\n")
    assert none.status_code == 400 and none.json()["error"]["field"] == "files", none.text


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/v1/datasets", "GET, POST"),  # two routes at one path: Starlette's 405 named the first's only
    ("PATCH", "/v1/datasets/ds_0000000000000000000000", "DELETE, GET"),
    ("OPTIONS", "/v1/datasets/ds_0000000000000000000000", "DELETE, GET"),
    ("DELETE", "/v1/jobs", "GET"),
    ("GET", "/v1/prune", "POST"),
    ("HEAD", "/v1/jobs/job_0000000000000000000000/selection", "GET"),
    ("POST", "/healthz", "GET"),
])
def test_a_405_names_every_method_of_the_path(http, method, path, allowed):
    r = http.request(method, path, headers=auth("acme"))
    assert r.status_code == 405 and r.headers["allow"] == allowed, (r.headers, r.text)
    if method != "HEAD":
        err = r.json()["error"]
        assert err["code"] == "method_not_allowed" and allowed in err["message"], err


def test_a_server_without_authentication_asks_for_no_key(service_env):
    """DEALREC_AUTH_DISABLED=1: no route requires the API key (nor says it answers 401 for one);
    /metrics keeps its tokens, /readyz its optional metrics credentials."""
    from app.main import create_app
    from worker.service.settings import Settings

    spec = create_app(Settings.from_env({**service_env, "DEALREC_AUTH_DISABLED": "1"})).openapi()
    assert "apiKey" not in json.dumps(spec)
    assert set(spec["components"]["securitySchemes"]) == {"metricsToken", "metricsAdminToken"}
    ops = {(m, p): op for m, p, op in _operations(spec)}
    tenant_routes = [op for (_, p), op in ops.items() if p.startswith("/v1/")]
    assert len(tenant_routes) >= 15
    assert all("security" not in op and "401" not in op["responses"] for op in tenant_routes)
    assert ops[("GET", "/metrics")]["security"] == [{"metricsToken": []}, {"metricsAdminToken": []}]
    assert "401" in ops[("GET", "/metrics")]["responses"]
    assert ops[("GET", "/readyz")]["security"] == [{}, {"metricsToken": []}, {"metricsAdminToken": []}]
