"""OpenAI's error shape, for every rbee server with /v1 routes (the worker and the queen).

`{"error": {"message", "type", "param", "code"}}` as OpenAI sends it (the SDKs read `type`,
`param` and `code` off it), with rbee's own code and hint beside them. No third-party imports.
"""

from __future__ import annotations

from typing import Any

from rbee_common.errors import RbeeError

OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 429: "rate_limit_error"}
OPENAI_CODE = {"MODEL_NOT_FOUND": "model_not_found", "QUEUE_FULL": "rate_limit_exceeded",
               "INVALID_MODEL_REF": "model_not_found"}


def openai_body(err: RbeeError, status: int) -> dict[str, Any]:
    """The error as OpenAI's error body for an HTTP `status`."""
    return {"error": {"message": err.message, "type": OPENAI_TYPE.get(status, "server_error"),
                      "param": err.details.get("field"),
                      "code": OPENAI_CODE.get(err.code, err.code.lower()),
                      "rbee_code": err.code, "hint": err.hint}}
