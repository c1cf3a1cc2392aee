"""Typed errors: every error the API answers becomes an exception carrying its status, `code` and
`message` (the body `{"error": {"code", "message", ...}}`), plus any other field it sent (a dataset
error's `file`, `line`, `field`)."""

from __future__ import annotations

from typing import Any


class DealrecError(Exception):
    """Base of every error this client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(DealrecError):
    """The service could not be reached (after the retries of an idempotent call)."""


class APIStatusError(DealrecError):
    """The API answered with an error status."""

    def __init__(self, status_code: int | None, code: str, message: str, details: dict[str, Any] | None = None,
                 request_id: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.details = details or {}
        self.request_id = request_id
        self.retry_after = retry_after  # seconds, from the answer's Retry-After (429, 503)
        self.retries = 0  # how many times the client sent the request again before giving up

    def __str__(self) -> str:
        status = f"{self.status_code} " if self.status_code else ""
        again = f" (after {self.retries} retries)" if self.retries else ""
        return f"{status}{self.code}: {self.message}{again}"


class BadRequestError(APIStatusError):
    """400: the request or its files cannot be used."""


class InvalidDatasetError(BadRequestError):
    """A dataset's file is malformed: refused at upload (400) or found `invalid` by the worker's
    validation (then `status_code` is None and `errors` holds every problem found)."""

    @property
    def file(self) -> str | None:
        return self.details.get("file")

    @property
    def line(self) -> int | None:
        return self.details.get("line")

    @property
    def field(self) -> str | None:
        return self.details.get("field")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.details.get("errors") or [{k: self.details.get(k) for k in ("file", "line", "field")}
                                              | {"code": self.code, "message": self.message}]


class AuthenticationError(APIStatusError):
    """401: no key, or a key the service does not know."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: no such dataset, job or file, or one of another tenant (the API does not tell them apart)."""


class ConflictError(APIStatusError):
    """409: the resource is not in a state that allows the call (a job not succeeded, a dataset not
    ready or in use, an Idempotency-Key reused with another request)."""


class PayloadTooLargeError(APIStatusError):
    """413: the upload is over the service's limit."""


class UnprocessableEntityError(APIStatusError):
    """422: a parameter is out of range or unknown; `field` names it."""

    @property
    def field(self) -> str | None:
        return self.details.get("field")


class QuotaExceededError(APIStatusError):
    """429: one of the tenant's limits is reached. `quota` says which (jobs, datasets or bytes), `limit`
    and `current` where the tenant stands, `setting` the server's variable, `retry_after` how long the
    server asked to wait. A job request (safe to repeat: it carries an Idempotency-Key) was retried
    first, `quota_retries` times, each after Retry-After; an upload is not retried (its quotas free
    only when the tenant deletes a dataset, and a repeated upload is not idempotent)."""

    @property
    def quota(self) -> str | None:
        return self.details.get("quota")

    @property
    def limit(self) -> float | None:
        return self.details.get("limit")

    @property
    def current(self) -> int | None:
        return self.details.get("current")

    @property
    def setting(self) -> str | None:
        return self.details.get("setting")

    def __str__(self) -> str:
        text = super().__str__()
        return text.replace(f"{self.code}:", f"{self.code} ({self.quota}):", 1) if self.quota else text


class ServiceUnavailableError(APIStatusError):
    """503: Redis or the queue is down (idempotent calls were retried first)."""


class InternalServerError(APIStatusError):
    """500 and other 5xx."""


class JobFailedError(DealrecError):
    """`Job.wait()` saw the job end `failed` (or `cancelled`): the job's own error code and message."""

    def __init__(self, job_id: str, status: str, code: str, message: str) -> None:
        super().__init__(f"job {job_id} {status}: {code}: {message}")
        self.job_id, self.status, self.code = job_id, status, code


class WaitTimeoutError(DealrecError, TimeoutError):
    """`wait(timeout=...)` ran out before the job (or dataset) finished; the job goes on."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 422: UnprocessableEntityError, 429: QuotaExceededError,
    503: ServiceUnavailableError,
}


def error_from_response(status_code: int, body: Any, request_id: str | None = None,
                        retry_after: float | None = None) -> APIStatusError:
    """The exception for an error response (`body` is the parsed JSON, or None when it was not JSON;
    `retry_after` the seconds of its Retry-After header)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"code": "http_error", "message": f"HTTP {status_code} without an error body"}
    code = str(err.get("code") or "http_error")
    message = str(err.get("message") or code)
    details = {k: v for k, v in err.items() if k not in ("code", "message")}
    if code == "invalid_dataset":
        cls: type[APIStatusError] = InvalidDatasetError
    elif status_code >= 500 and status_code != 503:
        cls = InternalServerError
    else:
        cls = _BY_STATUS.get(status_code, APIStatusError)
    return cls(status_code, code, message, details, request_id, retry_after)
