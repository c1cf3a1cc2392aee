"""The console's files are served by the API itself (no browser needed here): at / and /console/<file>,
without a key, with a strict Content Security Policy, and nothing else of the folder or beyond it."""

from __future__ import annotations

import re

from app.routes.console import CONSOLE_DIR


def test_console_is_served_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    # Every asset the page names is one of ours, served from this origin.
    assets = re.findall(r'(?:src|href)="(/console/[^"]+)"', r.text)
    assert set(assets) == {"/console/app.js", "/console/style.css"}
    for path in assets:
        a = client.get(path)
        assert a.status_code == 200 and a.content == (CONSOLE_DIR / path.rsplit("/", 1)[1]).read_bytes()
    assert client.get("/console/app.js").headers["content-type"].startswith("text/javascript")


def test_nothing_but_the_console_files(client):
    for path in ("/console/missing.js", "/console/..%2Fconsole.py", "/console/%2e%2e/routes/console.py",
                 "/console/../main.py"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


def test_the_console_fetches_nothing_from_elsewhere():
    for f in CONSOLE_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f.name
