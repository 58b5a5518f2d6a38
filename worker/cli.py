"""llm-worker-rbee: started by rbee-hive, never by hand in normal use.

    llm-worker-rbee --model PATH --backend cpu|cuda|metal [--device N[,N...]] --port P \
        [--host ADDR] --worker-id ID [--ctx N] [--rpc HOST:PORT[,...]] [--tensor-split F,F...]

The bearer token comes from $RBEE_WORKER_TOKEN or --token-file, never from argv.
A start-up failure ends the log with one `RBEE_ERROR {json}` line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rbee_common.errors import RbeeError
from rbee_common.names import BACKENDS
from worker.launch import check_devices, parse_devices, parse_split
from worker.protocol import ERROR_LINE_PREFIX, TOKEN_ENV

log = logging.getLogger("rbee.worker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-worker-rbee", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="path of the GGUF file")
    p.add_argument("--backend", required=True, choices=list(BACKENDS))
    p.add_argument("--device", type=_arg(parse_devices), default=(0,),
                   help="device index, or a comma list to split a model across GPUs (0,1)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--model-id", help="the model's name in /health and /v1/models")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores on cpu)")
    p.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    p.add_argument("--tensor-split", type=_arg(parse_split),
                   help="each device's share of the model, e.g. 0.6,0.4 (default: even; with "
                        "--rpc: by free memory, the lenders first)")
    p.add_argument("--rpc", type=_arg(_endpoints), default=(),
                   help="RPC lenders to put part of the model on, HOST:PORT[,HOST:PORT]")
    return p


def _endpoints(text: str) -> tuple[str, ...]:
    from rbee_common.rpc import parse_endpoints

    try:
        return tuple(parse_endpoints(text))
    except RbeeError as e:
        raise ValueError(e.message) from None


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def fail(err: RbeeError) -> None:
    sys.stderr.write(ERROR_LINE_PREFIX + json.dumps(err.to_dict()) + "\n")
    sys.stderr.flush()


def _token(args: argparse.Namespace) -> str:
    token = os.environ.pop(TOKEN_ENV, "")
    if args.token_file:
        token = args.token_file.read_text().strip()
    if len(token) < 16:
        raise RbeeError("no bearer token (or one under 16 characters): refusing to serve",
                        hint=f"Set {TOKEN_ENV} or pass --token-file.")
    return token


def _bind(host: str, port: int) -> socket.socket:
    from worker.errors import PortInUse

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_devices(args.backend, args.device, args.tensor_split, len(args.rpc))
    except RbeeError as e:
        parser.error(e.message)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = serve(args)
    except RbeeError as e:
        fail(e)
        code = 1
    sys.exit(code)


def serve(args: argparse.Namespace) -> int:
    from worker.engine import Engine, EngineSettings, default_threads
    from worker.server import Loading, run

    token = _token(args)
    engine = Engine(EngineSettings(model_path=args.model, backend=args.backend, ctx=args.ctx,
                                   threads=args.threads or default_threads(args.backend),
                                   n_devices=len(args.device), tensor_split=args.tensor_split,
                                   rpc=args.rpc, device_ids=args.device))
    sock = _bind(args.host, args.port)
    loading = Loading(engine)  # first: it runs while the HTTP stack below imports
    from worker.app import WorkerSettings, create_app

    settings = WorkerSettings(worker_id=args.worker_id, model_id=args.model_id or
                              Path(args.model).stem, backend=args.backend, devices=args.device,
                              ctx=args.ctx, token=token, rpc=args.rpc)
    app = create_app(settings, engine)
    return run(app, sock, loading, f"{args.host}:{args.port} as {args.worker_id}", fail)
