"""Constants of the worker's contract that need no pydantic (imported on hot paths)."""

HEALTH_SCHEMA = "rbee.worker.health/v1"
TOKEN_ENV = "RBEE_WORKER_TOKEN"
ERROR_LINE_PREFIX = "RBEE_ERROR "  # last line of a worker's log when it fails to start
MAX_BODY_BYTES = 1024 * 1024
