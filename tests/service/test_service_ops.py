"""Operational endpoints against the real API, worker and Redis (issue 14, item 7): /readyz names the
workers (host:pid) only to a tenant's key or a metrics token; /metrics answers only the metrics tokens,
is off (404) where none is configured, and shows series per tenant only to the admin token; /docs and
/redoc load every asset from this server, under a Content Security Policy that allows no other origin."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from svc_helpers import KEYS, METRICS_ADMIN_TOKEN, METRICS_TOKEN, auth, tiny_dataset, upload

from app.auth import load_keys
from worker.service.settings import ConfigError, Settings

BEARER_METRICS = {"Authorization": f"Bearer {METRICS_TOKEN}"}
BEARER_ADMIN = {"Authorization": f"Bearer {METRICS_ADMIN_TOKEN}"}


def _worker_id(worker) -> str:
    return f":{worker.proc.pid}"


# ---------------------------------------------------------------------------------------------------
# /readyz

def test_readyz_anonymous_gets_a_count_and_no_identities(client, worker):
    for headers in ({}, {"Authorization": "Bearer not-a-key-0123456789abcdef"}, {"Authorization": "Basic eA=="}):
        r = client.get("/readyz", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready" and set(body["checks"]) == {"redis", "workers", "queues", "unserved"}, body
        assert body["checks"]["redis"] is True and body["checks"]["workers"] >= 1
        # The session's worker consumes both queues (-Q cpu,gpu), as its heartbeat says.
        assert body["checks"]["queues"]["cpu"] >= 1 and body["checks"]["unserved"] == [], body
        assert _worker_id(worker) not in r.text and "@" not in r.text


@pytest.mark.parametrize("who", ["acme", "metrics", "admin"])
def test_readyz_names_the_workers_to_a_key_or_a_metrics_token(client, worker, who):
    r = client.get("/readyz", headers={"acme": auth("acme"), "metrics": BEARER_METRICS, "admin": BEARER_ADMIN}[who])
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert checks["workers"] == len(checks["worker_ids"]) >= 1
    assert any(w.endswith(_worker_id(worker)) for w in checks["worker_ids"]), checks


def test_readyz_counts_workers_per_queue_and_needs_one_on_cpu(client, worker, store):
    """A heartbeat names the queues its worker consumes: /readyz counts them per queue; a worker of an
    earlier version (a bare timestamp) counts for each. Without a live worker on `cpu`, where every
    upload and job starts, the service is not ready, however many GPU workers are alive."""
    gpu_only, legacy = "readyz-test-gpu:1", "readyz-test-legacy:2"
    try:
        store.worker_alive(gpu_only, 30, ["gpu"])
        store.r.set(store.key("worker", legacy), "2026-01-01T00:00:00+00:00", px=30_000)
        # The other live workers (an earlier test's killed worker may still be expiring) are read
        # before and after the call, so that the expected counts are those /readyz saw.
        for _ in range(20):
            others = {w: q for w, q in store.worker_queues().items() if w not in (gpu_only, legacy)}
            queues = client.get("/readyz").json()["checks"]["queues"]
            if others == {w: q for w, q in store.worker_queues().items() if w not in (gpu_only, legacy)}:
                break
        base = {q: sum(1 for names in others.values() if names is None or q in names) for q in ("cpu", "gpu")}
        assert queues == {"cpu": base["cpu"] + 1, "gpu": base["gpu"] + 2}, (others, queues)
        assert store.worker_queues()[gpu_only] == ["gpu"] and store.worker_queues()[legacy] is None
        store.r.delete(store.key("worker", legacy))
        own = next(w for w in store.live_workers() if w.endswith(_worker_id(worker)))
        with worker.paused():  # its heartbeat thread cannot rewrite the key meanwhile
            store.worker_alive(own, 30, ["gpu"])
            assert not [w for w, q in store.worker_queues().items() if q is None or "cpu" in q], \
                "another worker consumes cpu: this test needs the session's worker to be the only one"
            r = client.get("/readyz")
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert "cpu queue" in err["message"] and err["checks"]["unserved"] == ["cpu"], err
    finally:
        store.r.delete(store.key("worker", gpu_only), store.key("worker", legacy))
    # Resumed, the worker's next heartbeat names both of its queues again.
    assert wait_ready(client)


def wait_ready(client, timeout: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------------------------------
# /metrics

def test_metrics_answers_only_the_metrics_tokens(client):
    refused = []
    for headers, why in (({}, "none"), (auth("acme"), "a tenant key"), (auth("other"), "a tenant key"),
                         ({"Authorization": f"Bearer {METRICS_TOKEN}x"}, "another token"),
                         ({"Authorization": f"Bearer {METRICS_ADMIN_TOKEN}x"}, "another token"),
                         ({"Authorization": f"Bearer {METRICS_ADMIN_TOKEN[:-1]}"}, "another token"),
                         ({"Authorization": f"Basic {METRICS_TOKEN}"}, "not bearer"),
                         ({"Authorization": f"Basic {METRICS_ADMIN_TOKEN}"}, "not bearer")):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 401, (why, r.text)
        assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer", why
        assert "dealrec_" not in r.text
        refused.append(r.json())
    assert all(body == refused[0] for body in refused), refused  # one answer, whatever was wrong
    r = client.get("/metrics", headers=BEARER_METRICS)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    assert "# TYPE dealrec_jobs gauge" in r.text and "dealrec_workers " in r.text
    # The plain token: no series per tenant, no tenant's name anywhere.
    assert "tenant" not in r.text and not any(t in r.text for t in KEYS)


def _sample(text: str, series: str) -> float:
    """The value of one series (`name{labels}`) in an exposition text; AssertionError when absent."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    raise AssertionError(f"{series} not in:\n{text}")


def test_metrics_per_tenant_only_for_the_admin_token(client, api, worker, settings):
    """The admin token's scrape adds each configured tenant's jobs (active, held), datasets and stored
    bytes, read from the quotas: right after a dataset and jobs of a tenant of its own (`watched`) are
    created, and after they go. The plain token's scrape of the same moment names no tenant."""
    def scrape(headers: dict) -> str:
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 200, r.text
        return r.text

    d = upload(api, tiny_dataset(seed=5), tenant="watched")
    assert d["status"] == "ready", d
    size = sum(f["bytes"] for f in d["files"])
    held = 2  # jobs past DEALREC_TENANT_MAX_RUNNING wait in Redis
    with worker.paused():  # none of the jobs can start or end meanwhile
        jobs = [api("POST", "/v1/prune", tenant="watched", json={"dataset_id": d["id"], "budget": 3,
                                                                   "method": "random", "seed": i})
                for i in range(settings.tenant_max_running + held)]
        assert [r.status_code for r in jobs] == [202] * len(jobs), [r.text for r in jobs]
        admin, plain = scrape(BEARER_ADMIN), scrape(BEARER_METRICS)
        assert _sample(admin, 'dealrec_tenant_jobs{tenant="watched",state="active"}') == len(jobs)
        assert _sample(admin, 'dealrec_tenant_jobs{tenant="watched",state="held"}') == held
        assert _sample(admin, 'dealrec_tenant_datasets{tenant="watched"}') == 1
        assert _sample(admin, 'dealrec_tenant_stored_bytes{tenant="watched"}') == size
        assert "# TYPE dealrec_tenant_stored_bytes gauge" in admin
        for tenant in KEYS:  # every configured tenant has its series, whatever it holds
            _sample(admin, f'dealrec_tenant_datasets{{tenant="{tenant}"}}')
        # The global series are the same for both tokens; only the admin's names tenants.
        assert "# TYPE dealrec_jobs gauge" in plain and "dealrec_queue_depth" in admin
        assert "tenant" not in plain and not any(t in plain for t in KEYS), plain
        for r in jobs:  # still queued: cancelled at once
            assert api("POST", f"/v1/jobs/{r.json()['id']}/cancel", tenant="watched").status_code == 202
    assert api("DELETE", f"/v1/datasets/{d['id']}", tenant="watched").status_code == 204
    admin = scrape(BEARER_ADMIN)
    for series in ('dealrec_tenant_jobs{tenant="watched",state="active"}',
                   'dealrec_tenant_jobs{tenant="watched",state="held"}', 'dealrec_tenant_datasets{tenant="watched"}',
                   'dealrec_tenant_stored_bytes{tenant="watched"}'):
        assert _sample(admin, series) == 0, series


def test_metrics_is_off_without_a_token(start_api_server, worker):
    server = start_api_server(DEALREC_METRICS_TOKEN="", DEALREC_METRICS_ADMIN_TOKEN="")
    with server.client() as c:
        for headers in ({}, auth("acme"), BEARER_METRICS, BEARER_ADMIN):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 404, r.text
            err = r.json()["error"]
            assert err["code"] == "metrics_disabled" and "DEALREC_METRICS_TOKEN" in err["message"], err
        # /readyz still names the workers to a tenant, not to the (unconfigured) tokens
        assert "worker_ids" in c.get("/readyz", headers=auth("acme")).json()["checks"]
        for headers in (BEARER_METRICS, BEARER_ADMIN):
            assert "worker_ids" not in c.get("/readyz", headers=headers).json()["checks"]


def test_the_admin_token_alone_opens_metrics_to_the_operators_only(start_api_server, worker):
    server = start_api_server(DEALREC_METRICS_TOKEN="")
    with server.client() as c:
        r = c.get("/metrics", headers=BEARER_ADMIN)
        assert r.status_code == 200 and 'dealrec_tenant_datasets{tenant="acme"}' in r.text, r.text
        r = c.get("/metrics", headers=BEARER_METRICS)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text


def test_metrics_token_settings_are_checked():
    for name in ("DEALREC_METRICS_TOKEN", "DEALREC_METRICS_ADMIN_TOKEN"):
        with pytest.raises(ConfigError, match=f"{name}: must be at least 16 characters"):
            Settings.from_env({name: "short"})
        same = Settings.from_env({"DEALREC_API_KEYS": f"acme:{KEYS['acme']}", name: KEYS["acme"]})
        with pytest.raises(ConfigError, match=f"{name} must differ from every API key"):
            load_keys(same)
    both = Settings.from_env({"DEALREC_API_KEYS": f"acme:{KEYS['acme']}", "DEALREC_METRICS_TOKEN": METRICS_TOKEN,
                              "DEALREC_METRICS_ADMIN_TOKEN": METRICS_TOKEN})
    with pytest.raises(ConfigError, match="DEALREC_METRICS_ADMIN_TOKEN must differ from DEALREC_METRICS_TOKEN"):
        load_keys(both)
    ok = Settings.from_env({"DEALREC_API_KEYS": f"acme:{KEYS['acme']}", "DEALREC_METRICS_TOKEN": METRICS_TOKEN,
                            "DEALREC_METRICS_ADMIN_TOKEN": METRICS_ADMIN_TOKEN})
    assert load_keys(ok) == [("acme", KEYS["acme"])] and ok.metrics_token == METRICS_TOKEN
    assert ok.metrics_admin_token == METRICS_ADMIN_TOKEN


def test_the_schema_declares_the_metrics_answers(client):
    responses = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]
    assert {"200", "401", "404"} <= set(responses)


# ---------------------------------------------------------------------------------------------------
# /docs and /redoc

URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'|spec-url="([^"]+)\"""")


@pytest.mark.parametrize(("page", "assets"), [("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
                                               ("/redoc", {"redoc.standalone.js", "favicon.png"})])
def test_docs_pages_load_every_asset_from_this_server(client, page, assets):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text
    html = r.text
    assert "http://" not in html and "https://" not in html and "//" not in html.replace("<!--", ""), html
    urls = {next(g for g in m.groups() if g) for m in URL.finditer(html)}
    assert urls >= {f"/docs/assets/{a}" for a in assets} | {"/openapi.json"}, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        got = client.get(url)
        assert got.status_code == 200 and len(got.content) > 100, (url, got.status_code)
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    # The policy allows this origin only; an inline script (Swagger UI's bootstrap) by its exact hash.
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "http" not in csp and "*" not in csp and "unsafe-inline' ;" not in csp
    script_src = re.search(r"script-src ([^;]*)", csp).group(1).split()
    assert "'unsafe-inline'" not in script_src
    inline = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert script_src == ["'self'"] + [f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                                       for s in inline]


def test_docs_assets_are_served_by_name_only(client):
    for name in ("core.py", "..%2Fcore.py", "%2Fetc%2Fpasswd", "swagger-ui-bundle.js.map"):
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (name, r.text)
    assert client.get("/openapi.json").status_code == 200


def test_without_the_assets_package_docs_are_off_and_the_schema_stays(monkeypatch, settings):
    """Where fastapi-offline is not installed: /docs and /redoc are 404 (never FastAPI's CDN pages)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.routes import docs

    monkeypatch.setattr(docs, "assets_dir", lambda: None)
    with TestClient(create_app(settings)) as c:
        for page in ("/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js"):
            r = c.get(page)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (page, r.text)
        assert c.get("/openapi.json").json()["info"]["title"] == "dealrec"
