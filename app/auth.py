"""API keys: `Authorization: Bearer <key>`, each key belonging to one tenant.

Keys come from `DEALREC_API_KEYS="tenant1:key1,tenant2:key2"` and/or the file named by
`DEALREC_API_KEYS_FILE` (one `tenant:key` per line, `#` comments). Every configured key is compared
with `hmac.compare_digest`, all of them each time, so timing reveals neither a key nor which one matched."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

from fastapi import Request

from app.errors import ApiError
from worker.service.settings import ConfigError, Settings

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ANONYMOUS = "default"  # the one tenant when auth is disabled


def parse_keys(text: str, source: str) -> list[tuple[str, str]]:
    out = []
    for n, item in enumerate(re.split(r"[,\n]", text), 1):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        tenant, sep, key = item.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not key:
            raise ConfigError(f"{source}: entry {n} is not tenant:key")
        if not TENANT_RE.match(tenant):
            raise ConfigError(f"{source}: tenant name '{tenant}' must be letters, digits, '_', '.', '-'")
        if len(key) < 16:
            raise ConfigError(f"{source}: the key of tenant '{tenant}' is shorter than 16 characters")
        out.append((tenant, key))
    return out


def load_keys(settings: Settings) -> list[tuple[str, str]]:
    keys = parse_keys(settings.api_keys, "DEALREC_API_KEYS")
    if settings.api_keys_file:
        try:
            text = Path(settings.api_keys_file).read_text()
        except OSError as exc:
            raise ConfigError(f"DEALREC_API_KEYS_FILE: cannot read {settings.api_keys_file}: {exc}") from None
        keys += parse_keys(text, str(settings.api_keys_file))
    if not keys and not settings.auth_disabled:
        raise ConfigError("no API keys configured: set DEALREC_API_KEYS or DEALREC_API_KEYS_FILE "
                          "(or DEALREC_AUTH_DISABLED=1 to run without authentication)")
    return keys


class Authenticator:
    def __init__(self, keys: list[tuple[str, str]], disabled: bool = False) -> None:
        self.keys = [(t, k.encode()) for t, k in keys]
        self.disabled = disabled

    def tenant_of(self, authorization: str | None) -> str:
        if self.disabled:
            return ANONYMOUS
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _unauthorized("missing bearer token: send 'Authorization: Bearer <key>'")
        token = given.strip().encode()
        found = None
        for tenant, key in self.keys:
            if hmac.compare_digest(token, key) and found is None:
                found = tenant
        if found is None:
            raise _unauthorized("invalid API key")
        return found


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def require_tenant(request: Request) -> str:
    """FastAPI dependency: the caller's tenant."""
    return request.app.state.auth.tenant_of(request.headers.get("authorization"))
