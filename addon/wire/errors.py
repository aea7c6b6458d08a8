"""OpenAI-shaped error bodies: {"error": {"message", "type", "param", "code"}}.

Every answer the gateway makes itself goes through here, so clients (the openai SDK maps the
status to an exception class) always see one shape.
"""

from __future__ import annotations

import json

# on every error response: who refused, "gateway" (answered here) or "provider" (its own error)
ERROR_SOURCE = "x-gateway-error-source"

# status -> OpenAI error type, as OpenAI itself uses them
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
    529: "overloaded_error",
}


class GatewayError(Exception):
    """An error the gateway answers itself, never forwarding the request."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status)
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_dict(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> bytes:
    return json.dumps(error_dict(message, type, code, param)).encode()
