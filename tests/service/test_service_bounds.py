"""The work a request can ask for is bounded, and the schema says so (issue 14): every number of
`POST /v1/prune`'s body and every numeric query parameter has a `maximum` in /openapi.json, the same
bounds as the request model's, and a value past each one is a 422 naming the field. Only the API
runs here (nothing reaches a worker)."""

from __future__ import annotations

import json

import pytest

from tests.schema_bounds import numbers, over
from tests.service.svc_helpers import auth
from worker.service.requests import PruneRequest


def _request_numbers(spec: dict):
    body = spec["paths"]["/v1/prune"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return numbers(body, spec)


def test_every_number_of_the_prune_request_has_a_maximum_in_the_schema(spec):
    found = _request_numbers(spec)
    assert {"budget", "params.surrogate.epochs", "params.surrogate.eval_every", "params.influence.lissa_steps",
            "params.influence.cg_max_iter", "finetune.epochs", "finetune.evaluate.test_users"} \
        <= {n.path for n in found}
    assert [n.path for n in found if n.maximum is None] == []
    # The schema states the model's own bounds (FastAPI built it from the model; nothing lost on the way).
    local = {(n.path, n.kind): (n.maximum, n.exclusive) for n in numbers(PruneRequest.model_json_schema())}
    assert {(n.path, n.kind): (n.maximum, n.exclusive) for n in found} == local


def test_every_numeric_query_parameter_has_a_maximum(spec):
    params = [(path, p["name"], p["schema"]) for path, ops in spec["paths"].items() for op in ops.values()
              for p in op.get("parameters", ()) if p["in"] == "query"]
    numeric = [(path, name, n) for path, name, schema in params for n in numbers(schema, spec)]
    assert {("/v1/jobs/{job_id}/events", "after"), ("/v1/jobs", "limit")} <= {(p, name) for p, name, _ in numeric}
    assert [(p, name) for p, name, n in numeric if n.maximum is None] == []


def _body(path: str, value) -> str:
    """A request body setting the field at `path` (dotted) to `value`, as raw JSON."""
    node: object = value
    for key in reversed(path.split(".")):
        node = {key: node}
    assert isinstance(node, dict)
    return json.dumps({"dataset_id": "ds_0193b0c1d2e3a1b2c3d4e5", **node})


def test_a_value_past_each_bound_is_422_naming_the_field(http, spec):
    headers = {**auth("acme"), "Content-Type": "application/json"}
    checked = set()
    for n in _request_numbers(spec):
        r = http.post("/v1/prune", content=_body(n.path, over(n)), headers=headers)
        assert r.status_code == 422, (n, r.text)
        err = r.json()["error"]
        assert (err["code"], err["field"]) == ("invalid_request", n.path), (n, r.text)
        checked.add(n.path)
    assert len(checked) >= 30


@pytest.mark.parametrize(("path", "value"), [("params.surrogate.epochs", 10**9),
                                             ("params.surrogate.eval_every", 10**9),
                                             ("params.influence.lissa_steps", 10**12)])
def test_the_issues_absurd_values_are_422(http, path, value):
    r = http.post("/v1/prune", content=_body(path, value), headers={**auth("acme"), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == path, r.text
    assert "less than or equal to" in r.json()["error"]["message"]
