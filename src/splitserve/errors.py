"""Errors that become HTTP answers.

User code raises these (or the front does) and the server turns them into a JSON body
``{"error": {"type": ..., "message": ...}}`` with the matching status code. Any other
exception from user code becomes a 500 with its type and message, and the server goes on.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error with an HTTP status; the message is shown to the client."""

    status: int = 500
    kind: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind


# One class per status and kind: user code raises and catches them by type, so the
# repeated shape below is the point, not a copy to merge.


class BadRequest(ServiceError):
    status = 400
    kind = "bad_request"


class NotFound(ServiceError):
    status = 404
    kind = "not_found"


class PayloadTooLarge(ServiceError):
    status = 413
    kind = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    kind = "unsupported_media_type"


class Unprocessable(ServiceError):
    """The body parsed, but its content has the wrong shape (a JSON field missing, ...)."""

    status = 422
    kind = "unprocessable"


class Unauthorized(ServiceError):
    """The request lacks the server's bearer token (``--auth-token``)."""

    status = 401
    kind = "unauthorized"


class Overloaded(ServiceError):
    """The request cannot be served in time: retry later (503 with Retry-After).

    ``retry_after_s`` is the server's estimate of when capacity frees up.
    """

    status = 503
    kind = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """A process the request depended on died or is not ready (503)."""

    status = 503
    kind = "unavailable"


class ProcessDied(Unavailable):
    """The process running the request (a CPU worker, an engine) died under it (503).

    Inference has no side effects, so the server sends such work again, to another
    process or the replacement, before giving this answer (``--crash-retries``).
    """


class DeadlineExceeded(ServiceError):
    status = 504
    kind = "deadline_exceeded"


class Cancelled(ServiceError):
    """The work was dropped because nobody waits for its answer any more (the front's
    deadline passed or the client disconnected); 499 as nginx logs a client gone."""

    status = 499
    kind = "cancelled"


def error_status_and_kind(exc: BaseException) -> tuple[int, str, str]:
    """(status, kind, message) for any exception, as the server reports it."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.kind, exc.message
    return 500, "internal_error", f"{type(exc).__name__}: {exc}"
