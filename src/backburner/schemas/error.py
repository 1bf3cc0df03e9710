"""The OpenAI error envelope: the body of every error answer."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    """What is wrong, naming the field and what is allowed; every problem of a body at once."""
    type: str
    """``invalid_request_error``, ``authentication_error`` or ``server_error``."""
    param: str | None
    """The offending field by its path (``requests[3].messages``), or null."""
    code: str | None
    """A stable code (``invalid_request``, ``body_too_large``, ...), or null."""


class ErrorEnvelope(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail

    @classmethod
    def of(
        cls, message: str, *, type_: str, param: str | None = None, code: str | None = None
    ) -> ErrorEnvelope:
        return cls(error=ErrorDetail(message=message, type=type_, param=param, code=code))
