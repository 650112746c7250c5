"""The teacher's error tree and its one mapping to gRPC status codes.

Per-request errors (bad input, auth, a full queue, an expired deadline) are
answered and the server keeps serving; `EngineFailed` means the engine itself
is broken. The servicer maps these to status codes in one place
(`TeacherError.code`); any other exception on a request's path becomes
`InternalError` there (`as_teacher_error`), so every request is answered with
a status. The client maps the codes back (`client.py`).
"""

from __future__ import annotations

import grpc


class TeacherError(Exception):
    """Base of every error the servicer turns into a status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(TeacherError):
    """The request is malformed or outside the server's limits; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(TeacherError):
    code = grpc.StatusCode.UNAUTHENTICATED


class QueueFull(TeacherError):
    """The bounded queue is full; retry after `retry_after_s`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExpired(TeacherError):
    """The request's deadline passed before the engine got to it; its work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Draining(TeacherError):
    """The server is shutting down and takes no new work; another replica (or this one, restarted) will."""

    code = grpc.StatusCode.UNAVAILABLE


class EngineFailed(TeacherError):
    """The engine raised while running a batch (not the request's fault)."""

    code = grpc.StatusCode.INTERNAL


class InternalError(TeacherError):
    """An unexpected exception on one request's path (a backend's per-request failure, a bug); the message
    names the exception. Answered INTERNAL, logged and counted; the server keeps serving."""

    code = grpc.StatusCode.INTERNAL


def as_teacher_error(exc: Exception) -> TeacherError:
    """`exc` itself when it is a TeacherError, else an InternalError naming its type and message."""
    if isinstance(exc, TeacherError):
        return exc
    return InternalError(f"teacher failed on this request: {type(exc).__name__}: {exc}")
