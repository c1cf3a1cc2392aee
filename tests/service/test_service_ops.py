"""Operational endpoints against the real API, worker and Redis (issue 14, item 7): /readyz names the
workers (host:pid) only to a tenant's key or the metrics token; /metrics answers only the metrics
token, and is off (404) where none is configured."""

from __future__ import annotations

import pytest
from svc_helpers import KEYS, METRICS_TOKEN, auth

from app.auth import load_keys
from worker.service.settings import ConfigError, Settings

BEARER_METRICS = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def _worker_id(worker) -> str:
    return f":{worker.proc.pid}"


# ---------------------------------------------------------------------------------------------------
# /readyz

def test_readyz_anonymous_gets_a_count_and_no_identities(client, worker):
    for headers in ({}, {"Authorization": "Bearer not-a-key-0123456789abcdef"}, {"Authorization": "Basic eA=="}):
        r = client.get("/readyz", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready" and set(body["checks"]) == {"redis", "workers"}, body
        assert body["checks"]["redis"] is True and body["checks"]["workers"] >= 1
        assert _worker_id(worker) not in r.text and "@" not in r.text


@pytest.mark.parametrize("who", ["acme", "metrics"])
def test_readyz_names_the_workers_to_a_key_or_the_metrics_token(client, worker, who):
    r = client.get("/readyz", headers=auth("acme") if who == "acme" else BEARER_METRICS)
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert checks["workers"] == len(checks["worker_ids"]) >= 1
    assert any(w.endswith(_worker_id(worker)) for w in checks["worker_ids"]), checks


# ---------------------------------------------------------------------------------------------------
# /metrics

def test_metrics_answers_only_the_metrics_token(client):
    for headers, why in (({}, "none"), (auth("acme"), "a tenant key"), (auth("other"), "a tenant key"),
                         ({"Authorization": f"Bearer {METRICS_TOKEN}x"}, "another token"),
                         ({"Authorization": f"Basic {METRICS_TOKEN}"}, "not bearer")):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 401, (why, r.text)
        assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer", why
        assert "dealrec_" not in r.text
    r = client.get("/metrics", headers=BEARER_METRICS)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    assert "# TYPE dealrec_jobs gauge" in r.text and "dealrec_workers " in r.text
    # No series per tenant: no admin key exists to show them to.
    assert "tenant" not in r.text and "acme" not in r.text


def test_metrics_is_off_without_a_token(start_api_server, worker):
    server = start_api_server(DEALREC_METRICS_TOKEN="")
    with server.client() as c:
        for headers in ({}, auth("acme"), BEARER_METRICS):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 404, r.text
            err = r.json()["error"]
            assert err["code"] == "metrics_disabled" and "DEALREC_METRICS_TOKEN" in err["message"], err
        # /readyz still names the workers to a tenant, not to the (unconfigured) token
        assert "worker_ids" in c.get("/readyz", headers=auth("acme")).json()["checks"]
        assert "worker_ids" not in c.get("/readyz", headers=BEARER_METRICS).json()["checks"]


def test_metrics_token_settings_are_checked():
    with pytest.raises(ConfigError, match="DEALREC_METRICS_TOKEN"):
        Settings.from_env({"DEALREC_METRICS_TOKEN": "short"})
    same = Settings.from_env({"DEALREC_API_KEYS": f"acme:{KEYS['acme']}", "DEALREC_METRICS_TOKEN": KEYS["acme"]})
    with pytest.raises(ConfigError, match="must differ from every API key"):
        load_keys(same)
    ok = Settings.from_env({"DEALREC_API_KEYS": f"acme:{KEYS['acme']}", "DEALREC_METRICS_TOKEN": METRICS_TOKEN})
    assert load_keys(ok) == [("acme", KEYS["acme"])] and ok.metrics_token == METRICS_TOKEN


def test_the_schema_declares_the_metrics_answers(client):
    responses = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]
    assert {"200", "401", "404"} <= set(responses)
