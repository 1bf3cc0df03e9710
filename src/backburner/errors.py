"""One error tree for backburner.

    BackburnerError
    ├── InvalidRequest          400  bad input; names the field in ``param``
    ├── Unauthorized            401
    ├── NotFound                404  unknown id, or another tenant's object
    ├── Conflict                409  idempotency key reused with another body, finished generation
    ├── PayloadTooLarge         413
    ├── UnsupportedMediaType    415  a JSON route sent another content type
    ├── Forbidden               403  open mode, addressed to a host that is not loopback
    │   └── TenantDisabled      403  the key's tenant is disabled
    ├── TooManyRequests         429  a tenant's limit; ``retry_after`` where waiting helps
    ├── ServiceUnavailable      503
    ├── BackendError            an inference engine failed
    │   ├── BackendRetryable    5xx, timeout, connection: try again later
    │   └── BackendRejected     4xx: the request itself is bad, never retried
    └── Preempted               background work stopped to make room for realtime: requeue it,
                                the try is not counted

Each class's docstring is its default message; ``retryable`` is a class attribute, never parsed
from a string.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BackburnerError(Exception):
    """Something went wrong."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str | None = None, *, param: str | None = None, code: str | None = None
    ) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.param = param
        self.code = code
        super().__init__(self.message)


class InvalidRequest(BackburnerError):
    """The request is invalid."""

    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(BackburnerError):
    """Missing or invalid API key. Send 'Authorization: Bearer <key>'."""

    status_code = 401
    error_type = "authentication_error"


class NotFound(BackburnerError):
    """No such object."""

    status_code = 404
    error_type = "invalid_request_error"


class Conflict(BackburnerError):
    """The request conflicts with the current state."""

    status_code = 409
    error_type = "invalid_request_error"


class PayloadTooLarge(BackburnerError):
    """The request body is larger than this server accepts."""

    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaType(BackburnerError):
    """Send the body as JSON, with Content-Type: application/json."""

    status_code = 415
    error_type = "invalid_request_error"


class Forbidden(BackburnerError):
    """This request is not allowed."""

    status_code = 403
    error_type = "invalid_request_error"


class TenantDisabled(Forbidden):
    """This tenant is disabled. Ask the service's operators to enable it."""

    def __init__(self, tenant: str) -> None:
        super().__init__(
            f"tenant '{tenant}' is disabled: its keys do not work and its queued work is held"
            " until an operator enables it again",
            code="tenant_disabled",
        )


class TooManyRequests(BackburnerError):
    """A limit of this tenant was reached."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, limit: str, retry_after: float | None = None) -> None:
        super().__init__(message, code=f"{limit}_exceeded")
        self.limit = limit
        #: seconds after which the same request may succeed; None where waiting does not help
        self.retry_after = retry_after


class ServiceUnavailable(BackburnerError):
    """The service is not ready."""

    status_code = 503
    error_type = "server_error"


class BackendError(BackburnerError):
    """The inference backend failed."""

    status_code = 502
    error_type = "server_error"

    def __init__(
        self,
        message: str | None = None,
        *,
        upstream_status: int | None = None,
        body: Any = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.upstream_status = upstream_status
        self.body = body


class BackendRetryable(BackendError):
    """The inference backend is unavailable (5xx, timeout or connection error)."""

    retryable = True


class BackendRejected(BackendError):
    """The inference backend rejected the request."""

    status_code = 400
    error_type = "invalid_request_error"


class Preempted(BackburnerError):
    """Background work was preempted to make room for realtime requests."""

    status_code = 503
    retryable = True

    def __init__(self, message: str | None = None, *, seconds_lost: float = 0.0) -> None:
        super().__init__(message)
        self.seconds_lost = seconds_lost
