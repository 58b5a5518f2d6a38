"""The worker as it was before worker/server.py tuned its connections: uvicorn's stock HTTP
protocol (no TCP_NODELAY, no TCP_QUICKACK). bench/ttft.py runs it as its "before"."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uvicorn.protocols.http.auto import AutoHTTPProtocol

import worker.server

worker.server.http_protocol = lambda: AutoHTTPProtocol
from worker.cli import main  # noqa: E402

main()
