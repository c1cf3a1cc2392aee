"""Operational endpoints against the real API, worker and Redis (issue 14, item 7): /readyz names the
workers (host:pid) only to a tenant's key or the metrics token; /metrics answers only the metrics
token, and is off (404) where none is configured; /docs and /redoc load every asset from this server,
under a Content Security Policy that allows no other origin."""

from __future__ import annotations

import base64
import hashlib
import re

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
