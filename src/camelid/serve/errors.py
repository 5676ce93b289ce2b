"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Every answer that is not a success has this shape, whatever caused it (a bad body, a missing
key, an unknown route, a bug), so a client's error handling needs one branch. A bug's answer
is a generic 500; its traceback goes to the server's log, never to the client.
"""

from __future__ import annotations

import json
from typing import Any

from camelid.errors import RequestError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(RequestError):
    """A request the server refuses; ``param`` names the field at fault (None: the body)."""

    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_bytes(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> bytes:
    return json.dumps(error_body(message, status, param, code)).encode()
