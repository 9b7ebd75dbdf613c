"""OpenAI's error envelope, and the one mapping from every failure to a status and a message.

Clients written against OpenAI read ``{"error": {"message", "type", "param", "code"}}``; the
official SDK turns the status into its exception class (400 BadRequestError, 401, 404, 413, 429, ...).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from specasr_vllm.errors import AudioDecodeError, AudioTooLongError, InvalidRequestError, SpecASRError


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(exc: SpecASRError, param: str | None = None) -> APIError:
    """A user-caused engine error as the API reports it."""
    if isinstance(exc, AudioTooLongError):
        return APIError(400, str(exc), param="file", code="audio_too_long")
    if isinstance(exc, AudioDecodeError):
        return APIError(400, str(exc), param="file", code="invalid_audio")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=param, code="invalid_value")
    return APIError(400, str(exc), param=param)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's form validation failure, worded as OpenAI words it: the first bad field, by name."""
    first = exc.errors()[0]
    field = next((str(part) for part in reversed(first.get("loc", ())) if part not in ("body", "form")), None)
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter")
    return APIError(400, f"Invalid value for '{field}': {first.get('msg', 'invalid')}.", param=field,
                    code="invalid_value")


async def handle_api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def handle_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()
