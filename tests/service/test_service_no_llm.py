"""A server without an LLM (DEALREC_LLMS=none): it offers no model, `auto` included, so a job that
needs one (a method scored with effort, or fine-tuning) is refused with a 422 naming the field before
it exists, and the methods without one run as usual. Real API server, worker and Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from svc_helpers import FAST, auth, tiny_dataset, upload, wait_job

from worker.service.settings import Settings


def test_none_offers_no_model():
    assert Settings(llms="none").llm_choices() == {} and Settings(llms=" None ").llm_choices() == {}
    assert Settings(llms="").llm_choices() == {"auto": "auto"}
    assert Settings(llms="tiny=/m").llm_choices() == {"auto": "auto", "tiny": "/m"}


@pytest.fixture
def no_llm_api(start_api_server, worker) -> Iterator[Callable]:
    """api(method, url, tenant="acme", **kw) against a server of its own with DEALREC_LLMS=none."""
    client = start_api_server(DEALREC_LLMS="none").client()

    def call(method: str, url: str, tenant: str = "acme", **kw):
        return client.request(method, url, headers={**auth(tenant), **kw.pop("headers", {})}, **kw)

    yield call
    client.close()


def test_a_server_without_an_llm_runs_only_jobs_that_need_none(no_llm_api):
    ds = upload(no_llm_api, tiny_dataset(12, 10, seed=3))
    assert ds["status"] == "ready", ds
    jobs = lambda: no_llm_api("GET", "/v1/jobs?limit=200").json()["items"]  # noqa: E731
    before = len(jobs())
    for body, field in (({"method": "dealrec"}, "method"), ({"method": "effort"}, "method"),
                        ({"method": "greedy", "params": {"effort": {"llm": "auto"}}}, "method"),
                        ({"method": "random", "finetune": {"epochs": 1}}, "finetune")):
        r = no_llm_api("POST", "/v1/prune", json={"dataset_id": ds["id"], "budget": 3, **body})
        assert r.status_code == 422, (body, r.text)
        err = r.json()["error"]
        assert err["field"] == field and "runs no LLM" in err["message"], err
        assert "random, grand, el2n, ccs, influence" in err["message"], err
    assert len(jobs()) == before
    r = no_llm_api("POST", "/v1/prune", json={"dataset_id": ds["id"], "budget": 3, "method": "influence",
                                              "params": FAST})
    assert r.status_code == 202, r.text
    assert wait_job(no_llm_api, r.json()["id"])["status"] == "succeeded"
