"""Reading a request body into its model, or a CallerError that names what is wrong: `not
JSON` (reason `not_json`), or the first field that does not validate (`invalid_schema`).
Services answer it as `{"ok": false, "reason": ..., "error": ...}`."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from beamline.errors import CallerError, Reason

M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], data: bytes) -> M:
    try:
        return model.model_validate_json(data or b"{}")
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise CallerError(f"not JSON: send a {model.__name__}", Reason.NOT_JSON) from None
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise CallerError(
            f"not a valid {model.__name__}: {where}: {first['msg']}", Reason.INVALID_SCHEMA
        ) from None
