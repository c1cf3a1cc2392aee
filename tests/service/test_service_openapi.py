"""A 405 names in `Allow` every method the path answers (issue 14, item 7: schemathesis found it naming
only those of the first route at the path), against the live server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.service.svc_helpers import auth


@pytest.fixture(scope="module")
def http(api_server) -> Iterator[httpx.Client]:
    with api_server.client() as c:
        yield c


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
