"""gRPC errors with google.rpc details (BadRequest, RetryInfo, ErrorInfo), as the contract promises.

Handlers raise `ServiceError`; the servicer ends the call with `status()`, which carries the
google.rpc.Status in the `grpc-status-details-bin` trailer that
`grpc_status.rpc_status.from_call` reads back on the client.
"""
from __future__ import annotations

import math

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

RETRY_AFTER_SECONDS = 1.0  # what RetryInfo advises when the server is busy

# google.rpc.ErrorInfo reasons, for errors a client may want to tell apart from others of their
# status code (the HTTP shim answers them with their own HTTP statuses).
DOMAIN = "dragoman.v1"
AUDIO_TOO_LARGE = "AUDIO_TOO_LARGE"  # INVALID_ARGUMENT: more audio bytes than the server accepts
AUDIO_TIMEOUT = "AUDIO_TIMEOUT"  # DEADLINE_EXCEEDED: no message within the server's receive timeout


class ServiceError(Exception):
    """An error that ends a call with `code`, `message` and google.rpc error details."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[Message] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []

    def status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            status.details.add().Pack(detail)
        return rpc_status.to_status(status)


def invalid_argument(field: str, description: str, reason: str | None = None) -> ServiceError:
    """INVALID_ARGUMENT with a BadRequest naming the request field at fault (`config.language`),
    and an ErrorInfo when a `reason` is given."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    details: list[Message] = [error_details_pb2.BadRequest(field_violations=[violation])]
    if reason is not None:
        details.append(error_info(reason))
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", details)


def error_info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = math.floor(seconds)
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9)))


def resource_exhausted(message: str, retry_after: float = RETRY_AFTER_SECONDS) -> ServiceError:
    """RESOURCE_EXHAUSTED with RetryInfo: the server is busy now; the same call may work later."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, [retry_info(retry_after)])


def unavailable(message: str, retry_after: float = RETRY_AFTER_SECONDS) -> ServiceError:
    """UNAVAILABLE with RetryInfo: the model is loading or the server is going away."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, [retry_info(retry_after)])


def audio_timeout(seconds: float) -> ServiceError:
    """DEADLINE_EXCEEDED (AUDIO_TIMEOUT): the client sent nothing for `seconds` while the call waited on it."""
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the client sent nothing for {seconds:g} s (the server's receive timeout) while the call "
                        "waited on it", [error_info(AUDIO_TIMEOUT)])


def internal(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, message)


def cancelled(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.CANCELLED, message)

