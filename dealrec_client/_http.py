"""The HTTP layer: the bearer key on every request, errors turned into typed exceptions, and retries
with exponential backoff (honouring Retry-After) on 503 and on connection errors, for calls that are
safe to repeat: GET, DELETE, and a POST that carries an Idempotency-Key."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from dealrec_client.errors import APIConnectionError, ServiceUnavailableError, error_from_response

IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "PUT", "OPTIONS"})


class Transport:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 0.5, http: httpx.Client | None = None) -> None:
        headers = {"User-Agent": "dealrec-client/1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
        if http is not None:
            self.http.headers.update(headers)
        self.max_retries = max_retries
        self.backoff = backoff

    def close(self) -> None:
        self.http.close()

    def _retryable(self, method: str, headers: dict[str, str] | None) -> bool:
        return method.upper() in IDEMPOTENT or any(k.lower() == "idempotency-key" for k in (headers or {}))

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), 30.0)
            except ValueError:
                pass
        return min(self.backoff * 2 ** attempt, 20.0) * (0.5 + random.random() / 2)

    def request(self, method: str, url: str, *, retry: bool | None = None, **kw: Any) -> httpx.Response:
        """The response of a 2xx; raises the typed error otherwise (after the retries, where allowed)."""
        allowed = self._retryable(method, kw.get("headers")) if retry is None else retry
        attempt = 0
        while True:
            try:
                response = self.http.request(method, url, **kw)
            except httpx.TransportError as exc:
                if allowed and attempt < self.max_retries:
                    time.sleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                raise APIConnectionError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
            if response.status_code < 400:
                return response
            error = _error(response)
            if isinstance(error, ServiceUnavailableError) and allowed and attempt < self.max_retries:
                time.sleep(self._delay(attempt, response.headers.get("retry-after")))
                attempt += 1
                continue
            raise error

    def json(self, method: str, url: str, **kw: Any) -> Any:
        return self.request(method, url, **kw).json()

    @contextmanager
    def stream(self, url: str, **kw: Any) -> Iterator[httpx.Response]:
        """A GET whose body is read in chunks (downloads); errors as in `request`, retried before the body."""
        attempt, yielded = 0, False
        while True:
            try:
                with self.http.stream("GET", url, **kw) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = _error(response)
                        if isinstance(error, ServiceUnavailableError) and attempt < self.max_retries:
                            time.sleep(self._delay(attempt, response.headers.get("retry-after")))
                            attempt += 1
                            continue
                        raise error
                    yielded = True
                    yield response
                    return
            except httpx.TransportError as exc:
                if not yielded and attempt < self.max_retries:
                    time.sleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                raise APIConnectionError(f"GET {url}: {type(exc).__name__}: {exc}") from exc


def _error(response: httpx.Response):
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_response(response.status_code, body, response.headers.get("x-request-id"))
