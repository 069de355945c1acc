"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the HTTP status."""
from __future__ import annotations

import json
import math

# OpenAI's error types by status, as its API sends them.
TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    503: "server_error",
    504: "server_error",
}


class APIError(Exception):
    """An error answered to the client: HTTP status plus OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after: float | None = None, retry: bool | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after
        # OpenAI's SDKs retry 408, 409, 429 and every 5xx unless told otherwise (`x-should-retry`): a
        # request that ran out of time or that the service cannot do would only be decoded again.
        self.retry = retry

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> str:
        return json.dumps(self.body(), ensure_ascii=False)

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.retry_after is not None:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.retry is not None:
            h["x-should-retry"] = "true" if self.retry else "false"
        if self.status == 401:
            h["WWW-Authenticate"] = 'Bearer realm="dragoman"'
        return h

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)
