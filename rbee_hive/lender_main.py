"""The lender process: llama.cpp's RPC server on one device. Started by `rbee-hive rpc start`,
never by hand in normal use.

    python -m rbee_hive.lender_main --lender-id ID --endpoint HOST:PORT --backend cpu|cuda|metal
        [--threads N] [--cache-dir DIR]

A GPU lender sees only its device (rbee-hive sets CUDA_VISIBLE_DEVICES), so it lends that
device's VRAM and nothing else. A start-up failure ends the log with one `RBEE_ERROR {json}`
line and exit status 1, as a worker's does.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys

from rbee_common.errors import RbeeError
from rbee_common.names import BACKENDS

log = logging.getLogger("rbee.lender")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rbee-lender", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lender-id", required=True)
    p.add_argument("--endpoint", required=True, help="HOST:PORT to listen on")
    p.add_argument("--backend", required=True, choices=list(BACKENDS))
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores on cpu)")
    p.add_argument("--cache-dir", help="keep large tensors here, so a reload skips sending them")
    return p


def serve(args: argparse.Namespace) -> None:
    """Find the device and serve it; returns only when llama.cpp's server could not start."""
    from rbee_common.rpc import ggml, parse_endpoint
    from worker.engine import default_threads
    from worker.errors import BackendUnavailable, PortInUse

    host, port = parse_endpoint(args.endpoint)
    lib = ggml()
    lib.rpc_reg()
    devices = lib.local_devices(args.backend)
    if not devices:
        have = ", ".join(f"{d.name} ({d.backend})" for d in lib.devices()) or "none"
        raise BackendUnavailable(f"llama.cpp sees no {args.backend} device here (it sees: "
                                 f"{have})")
    device = devices[0]
    threads = args.threads or default_threads("cpu") or 1
    log.info("lender %s: lending %s (%s) at %s, %d thread(s)", args.lender_id, device.name,
             device.description, args.endpoint, threads)
    for handler in logging.getLogger().handlers:
        handler.flush()  # llama.cpp's server blocks from here on
    lib.start_server(f"{host}:{port}", [device], threads, args.cache_dir)
    ctypes.CDLL(None).fflush(None)  # llama.cpp's own words on why, before ours
    raise PortInUse(f"llama.cpp's RPC server could not listen on {args.endpoint} (see the "
                    "lines above)", hint="Start the lender again without --port.")


def main(argv: list[str] | None = None) -> None:
    from worker.cli import fail

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args)
    except RbeeError as e:
        fail(e)
    sys.exit(1)


if __name__ == "__main__":
    main()
