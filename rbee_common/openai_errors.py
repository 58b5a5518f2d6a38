"""OpenAI's error shape, for every rbee server with /v1 routes (the worker and the queen).

`{"error": {"message", "type", "param", "code"}}` as OpenAI sends it (the SDKs read `type`,
`param` and `code` off it), with rbee's own code and hint beside them. No third-party imports.
"""

from __future__ import annotations

from typing import Any

from rbee_common.errors import RbeeError

OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}
OPENAI_CODE = {"MODEL_NOT_FOUND": "model_not_found", "QUEUE_FULL": "rate_limit_exceeded",
               "INVALID_MODEL_REF": "model_not_found", "UNAUTHORIZED": "invalid_api_key"}


def openai_body(err: RbeeError, status: int) -> dict[str, Any]:
    """The error as OpenAI's error body for an HTTP `status`.

    `param` is the field at fault (details.field); `code` is the error's `openai_code` detail
    when it has one (OpenAI's own sub-codes: context_length_exceeded, unsupported_parameter…,
    which clients such as LiteLLM map to their exception classes; a detail, so it survives
    the trip through another rbee process), else OpenAI's name for rbee's code, else rbee's
    code in lower case.
    """
    reason = err.details.get("openai_code")
    return {"error": {"message": err.message, "type": OPENAI_TYPE.get(status, "server_error"),
                      "param": err.details.get("field"),
                      "code": reason or OPENAI_CODE.get(err.code, err.code.lower()),
                      "rbee_code": err.code, "hint": err.hint}}
