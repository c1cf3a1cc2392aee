"""Schemathesis against the live API (issue 14, item 7): `dealrec serve` as a real server process, the
session's real Celery worker and Redis, and the schema that server serves. Every operation gets
schema-driven requests, valid and invalid (the examples, coverage and fuzzing phases), and every answer
must be no server error and have a status code, Content-Type, headers and body that the schema declares
for it; a method the schema does not list must be a 405 whose `Allow` names those it does.

Not checked: positive_data_acceptance and negative_data_rejection. The first wants every schema-valid
request accepted, but some rules are not JSON Schema's to say (hidden_size a multiple of num_heads, a
file's name and content in a multipart part, a method that needs the LLM this server does not run): they
are 422s and 400s the schema declares. The second would blame the hooks below, which put real ids (and
the key) into requests generated as invalid.

What the fuzz can reach is bounded, so that it never costs the worker minutes:
- its server runs no LLM (DEALREC_LLMS=none): a job that needs one (effort-based methods, fine-tuning)
  is refused with 422 before it exists;
- its tenant (`fuzz`) owns tiny ready datasets and one succeeded job, whose ids the hooks put into the
  generated requests now and then (random ids alone would meet only 404s); DELETE gets a dataset of its
  own, so the routes tested after it still find theirs;
- every job the fuzz starts is cancelled at once (a random request may ask for 10,000 epochs).
It runs a bounded number of examples per operation (MAX_EXAMPLES in the fuzzing phase, plus the
coverage phase's boundary cases: about 1,400 requests in all), deterministically (the same cases every
run), each example within a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    allow_header_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from svc_helpers import FAST, ApiServer, tiny_dataset, upload, wait_job  # noqa: E402

from core.selection.methods import method_names, required_scores  # noqa: E402

FUZZ_KEY = "fuzz-key-0123456789abcdef"
FUZZ_AUTH = {"Authorization": f"Bearer {FUZZ_KEY}"}
MAX_EXAMPLES = 20
# What a server without an LLM runs (worker.service.jobs refuses the others there).
NO_LLM_METHODS = [m for m in method_names() if "effort" not in required_scores(m)]
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance,
          # a 405 for a method the schema does not list, with an Allow header naming the ones it does
          unsupported_method, allow_header_conformance, content_type_conformance, response_headers_conformance]


@pytest.fixture(scope="module")
def fuzz_server(service_env, worker, tmp_path_factory) -> Iterator[ApiServer]:
    """The API as `dealrec serve` with the session's settings, the fuzz tenant's key added, and no LLM."""
    env = {**service_env, "DEALREC_API_KEYS": f"{service_env['DEALREC_API_KEYS']},fuzz:{FUZZ_KEY}",
           "DEALREC_LLMS": "none"}
    server = ApiServer(env, tmp_path_factory.mktemp("fuzz-api-logs"), name="fuzz-api").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzz_http(fuzz_server) -> Iterator[httpx.Client]:
    with fuzz_server.client() as c:
        c.headers.update(FUZZ_AUTH)
        yield c


def _as_tenant(http: httpx.Client) -> Callable:
    """svc_helpers' api(method, url, tenant=..., **kw) over the fuzz tenant's client."""
    return lambda method, url, tenant=None, **kw: http.request(method, url, **kw)


@pytest.fixture(scope="module")
def owned(fuzz_http) -> dict[str, str]:
    """The fuzz tenant's tiny ready datasets (one to keep, one to delete) and a succeeded job."""
    api = _as_tenant(fuzz_http)
    keep = upload(api, tiny_dataset(12, 10, seed=1))
    spare = upload(api, tiny_dataset(12, 10, seed=2))
    assert keep["status"] == spare["status"] == "ready", (keep, spare)
    r = fuzz_http.post("/v1/prune", json={"dataset_id": keep["id"], "budget": 3, "method": "random",
                                          "params": FAST})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"])
    assert job["status"] == "succeeded", job
    return {"dataset": keep["id"], "spare_dataset": spare["id"], "job": job["id"]}


def _served_schema() -> dict:
    """The schema `dealrec serve` serves (test_the_fuzzed_schema_is_the_servers checks that it is), built
    from the app factory: pytest must know the operations when it collects the tests, before any server
    runs. (schemathesis.pytest.from_fixture, which would load it from the live server, reads a pytest
    attribute that pytest 9.2 no longer has.)"""
    from app.main import create_app
    from worker.service.settings import Settings

    return create_app(Settings.from_env({}, api_keys=f"fuzz:{FUZZ_KEY}")).openapi()


SPEC = _served_schema()
schema = schemathesis.openapi.from_dict(SPEC)
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")
# Filled by the `owned` fixture before the first case is generated; the hooks below read it.
OWNED: dict[str, str] = {}
FUZZ: dict[str, httpx.Client] = {}


@schema.hook
def flatmap_path_parameters(ctx, path_parameters: dict | None) -> st.SearchStrategy:
    """Half the time an id of the tenant's own: a job that exists, a dataset that is ready (DELETE gets
    the spare one)."""
    if not OWNED or not path_parameters:
        return st.just(path_parameters)
    dataset = OWNED["spare_dataset"] if ctx.operation.method.upper() == "DELETE" else OWNED["dataset"]
    known = {"dataset_id": dataset, "job_id": OWNED["job"]}
    return st.sampled_from([path_parameters, {k: known.get(k, v) for k, v in path_parameters.items()}])


@schema.hook
def flatmap_body(ctx, body):
    """Two prune requests in three name the tenant's ready dataset, and one of those two asks for a job
    this server can run (a method without an LLM, no fine-tuning): random bodies alone would nearly
    always be a 404 (an unknown dataset) or a 422 (an LLM method), and the 202 would go unchecked."""
    if ctx.operation.path != "/v1/prune" or not OWNED or not isinstance(body, dict) or "dataset_id" not in body:
        return st.just(body)
    ours = {**body, "dataset_id": OWNED["dataset"]}
    return st.one_of(st.just(body), st.just(ours),
                     st.sampled_from(NO_LLM_METHODS).map(lambda m: {**ours, "method": m, "finetune": None}))


@schema.hook
def after_call(ctx, case, response) -> None:
    """A job the fuzz started is cancelled at once: its random parameters may ask for hours of work, and
    the session's worker is shared with the other tests."""
    if case.operation.path == "/v1/prune" and response.status_code in (200, 202):
        FUZZ["http"].post(f"/v1/jobs/{response.json()['id']}/cancel")


@pytest.fixture(scope="module")
def fuzzing(fuzz_server, fuzz_http, owned) -> Iterator[str]:
    """The fuzz server's URL, with the hooks' ids and client set."""
    OWNED.update(owned)
    FUZZ["http"] = fuzz_http
    yield fuzz_server.url
    OWNED.clear()
    FUZZ.clear()


def test_the_fuzzed_schema_is_the_servers(fuzz_http):
    assert fuzz_http.get("/openapi.json").json() == SPEC


@schema.parametrize()
# A request that takes 30 s is a hung server. too_slow is about generating the cases (PruneRequest's
# fifty fields on a busy 2-core machine), not about the API: not a failure here.
@settings(deadline=timedelta(seconds=30), suppress_health_check=[HealthCheck.too_slow])
def test_the_api_answers_as_its_schema_says(case, fuzzing):
    case.call_and_validate(base_url=fuzzing, headers=FUZZ_AUTH, checks=CHECKS)


def test_the_fuzz_started_no_job_that_still_runs(fuzz_http, owned):
    """After the fuzz: every job of the fuzz tenant has finished or is cancelled (nothing left on the
    worker), and none ran an LLM stage."""
    deadline = time.monotonic() + 60
    while True:
        jobs = fuzz_http.get("/v1/jobs?limit=200").json()["items"]
        active = [j["id"] for j in jobs if j["status"] in ("queued", "running")]
        if not active or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert active == []
    assert not any(s in j.get("completed_stages", []) for j in jobs for s in ("effort", "finetune", "evaluate"))

