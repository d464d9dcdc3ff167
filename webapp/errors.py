"""JSON errors in the contract's shape: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

from quart import Quart, Response, jsonify
from werkzeug.exceptions import HTTPException

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_fields",
    503: "unavailable",
}


class ApiError(Exception):
    """An error a client caused or must know about, answered as JSON."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register(app: Quart) -> None:
    """Answer every HTTP error as JSON, never as an HTML page or a bare 500."""

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _CODES.get(status, "error")
        # The exception's own headers (a 405's Allow, a 401's WWW-Authenticate), not its HTML type.
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        return error_response(status, code, exc.description or code, headers)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "the server failed; the error is logged")
