"""API keys: `Authorization: Bearer <key>`, each key belonging to one tenant.

Keys come from `DEALREC_API_KEYS="tenant1:key1,tenant2:key2"` and/or the file named by
`DEALREC_API_KEYS_FILE` (one `tenant:key` per line, `#` comments). Every configured key is compared
with `hmac.compare_digest`, all of them each time, so timing reveals neither a key nor which one matched.

The metrics tokens are credentials apart, opening nothing under /v1: the metrics token
(`DEALREC_METRICS_TOKEN`, a scraper's) opens /metrics with the series of every tenant together; the
admin token (`DEALREC_METRICS_ADMIN_TOKEN`, the operators') opens it with each tenant's series too.
Either shows the workers' identities in /readyz; a tenant key opens neither."""

from __future__ import annotations

import hmac
import re
from pathlib import Path
from typing import Literal

from fastapi import Request, Security
from fastapi.security import HTTPBearer

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
    for name, token in (("DEALREC_METRICS_TOKEN", settings.metrics_token),
                        ("DEALREC_METRICS_ADMIN_TOKEN", settings.metrics_admin_token)):
        if token and any(hmac.compare_digest(token, key) for _, key in keys):
            raise ConfigError(f"{name} must differ from every API key (a tenant's key must not open /metrics)")
    if settings.metrics_admin_token and hmac.compare_digest(settings.metrics_admin_token, settings.metrics_token):
        raise ConfigError("DEALREC_METRICS_ADMIN_TOKEN must differ from DEALREC_METRICS_TOKEN (the plain token must "
                          "not show the series per tenant)")
    return keys


def _bearer(authorization: str | None) -> bytes | None:
    scheme, _, given = (authorization or "").partition(" ")
    return given.strip().encode() if scheme.lower() == "bearer" and given.strip() else None


MetricsScope = Literal["plain", "admin"]


class Authenticator:
    def __init__(self, keys: list[tuple[str, str]], disabled: bool = False, metrics_token: str = "",
                 metrics_admin_token: str = "") -> None:
        self.keys = [(t, k.encode()) for t, k in keys]
        self.disabled = disabled
        self.metrics_token = metrics_token.encode()
        self.metrics_admin_token = metrics_admin_token.encode()

    @property
    def metrics_enabled(self) -> bool:
        """/metrics answers someone: either metrics token is configured (else it is off: 404)."""
        return bool(self.metrics_token or self.metrics_admin_token)

    def tenants(self) -> list[str]:
        """Every tenant a key is configured for (the one anonymous tenant when authentication is off)."""
        return [ANONYMOUS] if self.disabled else sorted({t for t, _ in self.keys})

    def _tenant_of_token(self, token: bytes) -> str | None:
        found = None
        for tenant, key in self.keys:
            if hmac.compare_digest(token, key) and found is None:
                found = tenant
        return found

    def tenant_of(self, authorization: str | None) -> str:
        if self.disabled:
            return ANONYMOUS
        token = _bearer(authorization)
        if token is None:
            raise _unauthorized("missing bearer token: send 'Authorization: Bearer <key>'")
        found = self._tenant_of_token(token)
        if found is None:
            raise _unauthorized("invalid API key")
        return found

    def metrics_scope(self, authorization: str | None) -> MetricsScope | None:
        """What a /metrics request may see: "admin" (the admin token: the series per tenant too),
        "plain" (the metrics token) or None (neither). Both tokens are compared every time, so the
        timing does not tell which one was close."""
        token = _bearer(authorization)
        if token is None:
            return None
        plain = bool(self.metrics_token) and hmac.compare_digest(token, self.metrics_token)
        admin = bool(self.metrics_admin_token) and hmac.compare_digest(token, self.metrics_admin_token)
        return "admin" if admin else "plain" if plain else None

    def is_identified(self, authorization: str | None) -> bool:
        """A configured tenant key or a metrics token (no error either way: for endpoints that answer
        everyone and tell a caller with a credential more). With authentication disabled a request
        without one is not identified either: every request is then tenant 'default', anonymous ones too."""
        token = _bearer(authorization)
        if token is None:
            return False
        # Every kind compared every time: the timing does not tell which kind of credential was sent.
        tenant = self._tenant_of_token(token)
        metrics = self.metrics_scope(authorization)
        return tenant is not None or metrics is not None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


# The two bearer schemes as /openapi.json declares them (components.securitySchemes, and `security` on
# each route that depends on one). auto_error=False: they only declare; the Authenticator reads the
# header itself, tells a missing key from an unknown one, and answers with the API's JSON error body.
API_KEY_SCHEME = HTTPBearer(scheme_name="apiKey", auto_error=False,
                            description="a tenant's API key (DEALREC_API_KEYS): every /v1 route")
METRICS_TOKEN_SCHEME = HTTPBearer(scheme_name="metricsToken", auto_error=False,
                                  description="the scrapers' token (DEALREC_METRICS_TOKEN): /metrics, every "
                                              "tenant together")
METRICS_ADMIN_TOKEN_SCHEME = HTTPBearer(scheme_name="metricsAdminToken", auto_error=False,
                                        description="the operators' token (DEALREC_METRICS_ADMIN_TOKEN): /metrics "
                                                    "with the series of each tenant too")


def require_tenant(request: Request, _declared: object = Security(API_KEY_SCHEME)) -> str:
    """FastAPI dependency: the caller's tenant."""
    return request.app.state.auth.tenant_of(request.headers.get("authorization"))


def declare_metrics_token(_plain: object = Security(METRICS_TOKEN_SCHEME),
                          _admin: object = Security(METRICS_ADMIN_TOKEN_SCHEME)) -> None:
    """FastAPI dependency of /metrics, for its schema only (either token: two security requirements, of
    which one must hold): the route checks the token itself (a wrong one is a 401, none configured a 404)."""
