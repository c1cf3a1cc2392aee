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
    # app.js imports its sibling modules: a classic script could not.
    assert '<script type="module" src="/console/app.js"></script>' in r.text
    for path in assets:
        a = client.get(path)
        assert a.status_code == 200 and a.content == (CONSOLE_DIR / path.rsplit("/", 1)[1]).read_bytes()
    assert client.get("/console/app.js").headers["content-type"].startswith("text/javascript")


IMPORT = re.compile(r'^import\s(?:[^;"]*?\sfrom\s+)?"([^"]+)"', re.M)


def test_every_console_module_is_served_as_javascript(client):
    # The modules app.js imports, and theirs: each a sibling named by relative path (a bare name or a
    # URL would need an import map or another origin), each served as JavaScript (a browser refuses to
    # run a module served as anything else), and every .js file of the folder is one of them.
    seen, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        r = client.get(f"/console/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript"), name
        policy = r.headers["content-security-policy"]
        assert "script-src 'self'" in policy and r.headers["x-content-type-options"] == "nosniff", name
        assert r.content == (CONSOLE_DIR / name).read_bytes(), name
        for spec in IMPORT.findall(r.text):
            assert re.fullmatch(r"\./[a-z][a-z0-9-]*\.js", spec), (name, spec)
            todo.append(spec[2:])
    assert seen == {p.name for p in CONSOLE_DIR.glob("*.js")} and len(seen) > 1, seen


def test_nothing_but_the_console_files(client):
    for path in ("/console/missing.js", "/console/..%2Fconsole.py", "/console/%2e%2e/routes/console.py",
                 "/console/../main.py"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


def test_the_console_fetches_nothing_from_elsewhere():
    for f in CONSOLE_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f.name
