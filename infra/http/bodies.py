"""Request bodies and path parameters, parsed by hand so that the key is checked first.

FastAPI would decode a JSON body parameter before the route's dependencies run: a stranger's
bad body would get 400, not 401. Routes read the body (``json_body``) after ``may_act``, and
describe it in the OpenAPI document with ``body_doc``, since FastAPI cannot see it.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeVar

from fastapi import Path, Request
from pydantic import BaseModel, ValidationError

from contracts.events import ACCOUNT_ID_PATTERN
from infra.http import errors
from infra.http.errors import ApiError

_M = TypeVar("_M", bound=BaseModel)

#: Larger bodies are refused (413) before they are parsed.
MAX_BODY_BYTES: Final = 65_536

#: An ``{account_id}`` path parameter (422 ``validation_error`` when it is not an account id).
AccountPath = Annotated[str, Path(pattern=ACCOUNT_ID_PATTERN)]


def parse_body(raw: bytes, model: type[_M], *, optional: bool = False) -> _M:
    """Validate a JSON body with pydantic's own parser: 400 if it is not JSON, 422 if it is
    not what ``model`` takes. An empty body is ``model()`` when ``optional``."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if optional:
            return model()
        raise ApiError(400, "malformed_json", "a JSON body is required")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise errors.from_validation(exc.errors()) from None


async def json_body(request: Request, model: type[_M], *, optional: bool = False) -> _M:
    """The request's body as ``model`` (see ``parse_body``)."""
    return parse_body(await request.body(), model, optional=optional)


def body_doc(model: type[BaseModel], *, required: bool = True) -> dict[str, object]:
    """``openapi_extra`` describing a body read by ``json_body``."""
    schema = model.model_json_schema(by_alias=True)
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema}},
        }
    }
