"""llama.cpp's RPC backend: one model's layers spread over several hosts.

A *lender* runs llama.cpp's RPC server on one device of its host (a process of its own, see
rbee_hive.lenders); a *borrower* (a worker) adds the lender's endpoint as a device and puts
part of the model there. This module holds what both sides share:

- the wire protocol's opening, spoken in pure Python with a timeout (`handshake`): HELLO
  (the protocol version), then the device count and each device's memory. llama.cpp's own
  client aborts the whole process when an endpoint does not answer or speaks another
  version, so a worker asks every endpoint here first and refuses with a coded error;
- ctypes bindings to the few ggml functions llama-cpp-python does not bind (`GgmlRpc`):
  `ggml_backend_rpc_start_server` (lender) and `ggml_backend_rpc_add_server` (borrower),
  found through the backend registry of the libggml that libllama itself uses.

The protocol, as vendor/llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp of llama-cpp-python 0.3.36
speaks it (little-endian): a request is `cmd (u8) | size (u64) | body`, a reply is
`size (u64) | body`. HELLO (cmd 14) sends 24 bytes of transport capabilities (all zero: plain
TCP) and gets `major, minor, patch, pad (u8 each) | 24 bytes of capabilities`; DEVICE_COUNT
(15) sends nothing and gets a u32; GET_DEVICE_MEMORY (11) sends the device (u32) and gets
`free, total` (u64 each). The server serves one client at a time: a second client's
connection is accepted by the kernel but nothing answers it until the first one leaves.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rbee_common.errors import (
    LenderBusy,
    LenderUnreachable,
    RpcProtocolMismatch,
    RpcUnavailable,
    UsageError,
)

CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24
HELLO_REPLY = struct.Struct("<BBBB24s")
HANDSHAKE_TIMEOUT_S = 3.0  # a lender behind an SSH tunnel answers in one round trip or two
TIMEOUT_ENV = "RBEE_RPC_TIMEOUT"

# the protocol version of llama-cpp-python releases (ggml-rpc.h's RPC_PROTO_*_VERSION): the
# library does not export it, so a build whose headers are not installed is looked up here
KNOWN_PROTOCOLS: dict[str, tuple[int, int, int]] = {"0.3.36": (7, 0, 0)}
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def handshake_timeout() -> float:
    """Seconds a handshake may take: $RBEE_RPC_TIMEOUT, default 3."""
    from rbee_common.config import env_number

    return float(env_number(TIMEOUT_ENV, HANDSHAKE_TIMEOUT_S, minimum=0.01, integer=False))


def parse_endpoint(text: str) -> tuple[str, int]:
    """`HOST:PORT` → (host, port); USAGE otherwise. llama.cpp cuts an endpoint at its first
    colon, so an IPv6 address cannot be one."""
    host, sep, port = text.strip().partition(":")
    if not sep or not _HOST_RE.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"RPC endpoint {text!r}: expected HOST:PORT, e.g. 127.0.0.1:50052",
                         hint="An IPv6 address cannot be an RPC endpoint (llama.cpp cuts it at "
                              "its first colon); use a host name or an IPv4 address.")
    return host, int(port)


def parse_endpoints(text: str) -> list[str]:
    """`--rpc HOST:PORT[,HOST:PORT]` → distinct endpoints, in order."""
    out: list[str] = []
    for part in text.split(","):
        host, port = parse_endpoint(part)
        endpoint = f"{host}:{port}"
        if endpoint in out:
            raise UsageError(f"--rpc names {endpoint} twice")
        out.append(endpoint)
    return out


def version_text(version: Sequence[int]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class DeviceMemory:
    free: int
    total: int


@dataclass(frozen=True)
class LenderInfo:
    """What a lender said in the handshake."""

    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[DeviceMemory, ...]
    took_ms: float

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)


class _Conversation:
    """One connection to a lender, every read and write bounded by one deadline."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        host, port = parse_endpoint(endpoint)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as e:
            raise LenderUnreachable(
                f"RPC lender {endpoint} did not accept a connection within {timeout:g}s",
                hint=_unreachable_hint(endpoint), endpoint=endpoint) from e
        except OSError as e:
            raise LenderUnreachable(
                f"cannot connect to RPC lender {endpoint}: {e.strerror or e}",
                hint=_unreachable_hint(endpoint), endpoint=endpoint) from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def request(self, cmd: int, body: bytes, reply_size: int, what: str) -> bytes:
        """Send one command and read its reply of `reply_size` bytes."""
        try:
            self.sock.settimeout(self._left())
            self.sock.sendall(struct.pack("<BQ", cmd, len(body)) + body)
            size = struct.unpack("<Q", self._read(8, what))[0]
        except TimeoutError as e:
            raise LenderBusy(
                f"RPC lender {self.endpoint} accepted the connection but did not answer "
                f"{what} within {self.timeout:g}s: it is serving another client (a lender "
                "serves one worker at a time)",
                hint=f"Stop the worker that borrows from {self.endpoint} (`rbee-hive worker "
                     "list` on the borrowing host), or start another lender (`rbee-hive rpc "
                     f"start`); raise {TIMEOUT_ENV} if the link is slow.",
                endpoint=self.endpoint) from e
        except OSError as e:
            raise LenderUnreachable(
                f"RPC lender {self.endpoint} dropped the connection during {what}: "
                f"{e.strerror or e}", hint=_unreachable_hint(self.endpoint),
                endpoint=self.endpoint) from e
        if size != reply_size:
            raise RpcProtocolMismatch(
                f"RPC lender {self.endpoint} answered {what} with {size} bytes, not "
                f"{reply_size}: it speaks another version of llama.cpp's RPC protocol",
                hint=_mismatch_hint(self.endpoint), endpoint=self.endpoint)
        try:
            self.sock.settimeout(self._left())
            return self._read(reply_size, what)
        except (TimeoutError, OSError) as e:
            raise LenderUnreachable(
                f"RPC lender {self.endpoint} stopped in the middle of its answer to {what}",
                hint=_unreachable_hint(self.endpoint), endpoint=self.endpoint) from e

    def _read(self, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise LenderUnreachable(
                    f"RPC lender {self.endpoint} closed the connection without answering "
                    f"{what}: nothing serves llama.cpp's RPC there (a tunnel whose far end is "
                    "down does this), or a llama.cpp too old or new to talk to",
                    hint=_unreachable_hint(self.endpoint), endpoint=self.endpoint)
            buf += chunk
        return bytes(buf)


def _unreachable_hint(endpoint: str) -> str:
    return (f"Check the lender behind {endpoint} runs (`rbee-hive rpc list` on its host; "
            "`rbee-hive rpc start` starts one) and that any tunnel to it is up.")


def _mismatch_hint(endpoint: str) -> str:
    return (f"Run the same llama-cpp-python build on both hosts (`rbee hosts install` "
            f"reinstalls it), then restart the lender behind {endpoint}.")


def handshake(endpoint: str, timeout: float | None = None,
              expect: tuple[int, int, int] | None = None) -> LenderInfo:
    """Speak HELLO, DEVICE_COUNT and GET_DEVICE_MEMORY to a lender, within `timeout` seconds.

    Raises RPC_LENDER_UNREACHABLE (nothing there, or it hung up), RPC_LENDER_BUSY (connected
    but silent: it serves someone else) or RPC_PROTOCOL_MISMATCH (another version than
    `expect`; by default this build's, when known)."""
    timeout = handshake_timeout() if timeout is None else timeout
    expect = protocol_version() if expect is None else expect
    t0 = time.perf_counter()
    conv = _Conversation(endpoint, timeout)
    try:
        reply = conv.request(CMD_HELLO, bytes(CONN_CAPS_SIZE), HELLO_REPLY.size, "HELLO")
        major, minor, patch, _, _ = HELLO_REPLY.unpack(reply)
        version = (major, minor, patch)
        if expect is not None and version != expect:
            raise RpcProtocolMismatch(
                f"RPC lender {endpoint} speaks RPC protocol {version_text(version)}, this "
                f"build speaks {version_text(expect)}: both ends must run the same llama.cpp",
                hint=_mismatch_hint(endpoint), endpoint=endpoint,
                lender_version=version_text(version), local_version=version_text(expect))
        count = struct.unpack("<I", conv.request(CMD_DEVICE_COUNT, b"", 4, "DEVICE_COUNT"))[0]
        devices = []
        for index in range(min(count, 16)):
            free, total = struct.unpack("<QQ", conv.request(
                CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16, "GET_DEVICE_MEMORY"))
            devices.append(DeviceMemory(free, total))
    finally:
        conv.close()
    return LenderInfo(endpoint, version, tuple(devices),
                      round((time.perf_counter() - t0) * 1000, 2))


# -- this build ---------------------------------------------------------------------------


@cache
def protocol_version() -> tuple[int, int, int] | None:
    """The RPC protocol version this llama-cpp-python build speaks: from its installed
    ggml-rpc.h when there is one, else from KNOWN_PROTOCOLS; None when neither says."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    # scikit-build-core installs llama.cpp's headers beside the package, in site-packages
    for header in (package / "include" / "ggml-rpc.h", package.parent / "include" / "ggml-rpc.h"):
        with contextlib.suppress(OSError):
            found = _version_in_header(header.read_text())
            if found is not None:
                return found
    try:
        from importlib.metadata import version

        return KNOWN_PROTOCOLS.get(version("llama_cpp_python"))
    except Exception:  # no metadata: a build from a checkout
        return None


def _version_in_header(text: str) -> tuple[int, int, int] | None:
    parts = [re.search(rf"#define\s+RPC_PROTO_{p}_VERSION\s+(\d+)", text)
             for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    major, minor, patch = (int(m.group(1)) for m in parts if m is not None)
    return major, minor, patch


# -- ctypes bindings ----------------------------------------------------------------------

DEV_TYPE_CPU, DEV_TYPE_GPU, DEV_TYPE_IGPU = 0, 1, 2
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@dataclass(frozen=True)
class Device:
    """A ggml backend device: its handle and what it calls itself."""

    handle: int
    name: str
    description: str
    kind: int  # DEV_TYPE_*
    backend: str  # the name of its backend registry: CPU, CUDA, Metal, RPC[host:port]

    def memory(self, lib: GgmlRpc) -> DeviceMemory:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.fn.ggml_backend_dev_memory(self.handle, ctypes.byref(free), ctypes.byref(total))
        return DeviceMemory(int(free.value), int(total.value))


class GgmlRpc:
    """The ggml functions rbee needs that llama-cpp-python does not bind.

    They are looked up through libllama's own handle: the dynamic linker then searches
    libllama and the libraries it was linked against, so these are the functions (and the
    backend registry) of the very libggml that llama.cpp uses. The wheel ships libggml.so and
    libggml.so.0 as two separate files: opening one of them by path could load a second
    copy, with a second, empty registry.
    """

    def __init__(self) -> None:
        import llama_cpp.llama_cpp as lc

        self.llama = lc
        self.fn = lc._lib
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "ggml_backend_reg_by_name": (ctypes.c_void_p, [ctypes.c_char_p]),
            "ggml_backend_reg_get_proc_address": (ctypes.c_void_p,
                                                  [ctypes.c_void_p, ctypes.c_char_p]),
            "ggml_backend_reg_name": (ctypes.c_char_p, [ctypes.c_void_p]),
            "ggml_backend_reg_dev_count": (ctypes.c_size_t, [ctypes.c_void_p]),
            "ggml_backend_reg_dev_get": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
            "ggml_backend_dev_count": (ctypes.c_size_t, []),
            "ggml_backend_dev_get": (ctypes.c_void_p, [ctypes.c_size_t]),
            "ggml_backend_dev_name": (ctypes.c_char_p, [ctypes.c_void_p]),
            "ggml_backend_dev_description": (ctypes.c_char_p, [ctypes.c_void_p]),
            "ggml_backend_dev_type": (ctypes.c_int, [ctypes.c_void_p]),
            "ggml_backend_dev_backend_reg": (ctypes.c_void_p, [ctypes.c_void_p]),
            "ggml_backend_dev_memory": (None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                               ctypes.POINTER(ctypes.c_size_t)]),
            "ggml_set_abort_callback": (ctypes.c_void_p, [_ABORT_CALLBACK]),
        }
        for name, (restype, argtypes) in sigs.items():
            f = getattr(self.fn, name)
            f.restype, f.argtypes = restype, argtypes
        self._abort_callback: Any = None

    def rpc_reg(self) -> int:
        """The RPC backend's registry entry; RPC_UNAVAILABLE without one."""
        if not self.llama.llama_supports_rpc():
            raise RpcUnavailable("this llama-cpp-python build has no RPC backend")
        reg = self.fn.ggml_backend_reg_by_name(b"RPC")
        if not reg:
            raise RpcUnavailable("llama.cpp's backend registry has no RPC backend")
        return int(reg)

    def _proc(self, name: str, proto: Any) -> Any:
        addr = self.fn.ggml_backend_reg_get_proc_address(self.rpc_reg(), name.encode())
        if not addr:
            raise RpcUnavailable(f"the RPC backend of this build does not offer {name}")
        return proto(addr)

    def devices(self) -> list[Device]:
        """Every device of llama.cpp's backend registry (CPU, GPUs; not RPC lenders)."""
        out = []
        for i in range(self.fn.ggml_backend_dev_count()):
            out.append(self._device(int(self.fn.ggml_backend_dev_get(i))))
        return out

    def _device(self, handle: int) -> Device:
        f = self.fn
        reg = f.ggml_backend_dev_backend_reg(handle)
        return Device(handle, (f.ggml_backend_dev_name(handle) or b"").decode(),
                      (f.ggml_backend_dev_description(handle) or b"").decode(),
                      int(f.ggml_backend_dev_type(handle)),
                      (f.ggml_backend_reg_name(reg) or b"").decode() if reg else "")

    def local_devices(self, backend: str) -> list[Device]:
        """The devices of a backend as this process sees them, in order (cpu: the CPU;
        cuda/metal: the GPUs, which CUDA_VISIBLE_DEVICES has narrowed to the chosen ones)."""
        devs = [d for d in self.devices() if not d.backend.startswith("RPC")]
        if backend == "cpu":
            return [d for d in devs if d.kind == DEV_TYPE_CPU][:1]
        want = {"cuda": ("CUDA",), "metal": ("MTL", "Metal")}.get(backend, (backend,))
        return [d for d in devs if d.kind in (DEV_TYPE_GPU, DEV_TYPE_IGPU)
                and d.backend.startswith(want)]

    def add_server(self, endpoint: str) -> list[Device]:
        """Register a lender and return its devices (RPC0, RPC1, …).

        llama.cpp aborts the process if the endpoint does not answer or speaks another
        version: call handshake() on it first."""
        reg = self._proc("ggml_backend_rpc_add_server", _ADD_SERVER)(endpoint.encode())
        if not reg:
            raise LenderUnreachable(f"RPC lender {endpoint} offers no device",
                                    hint=_unreachable_hint(endpoint), endpoint=endpoint)
        n = self.fn.ggml_backend_reg_dev_count(reg)
        return [self._device(int(self.fn.ggml_backend_reg_dev_get(reg, i))) for i in range(n)]

    def start_server(self, endpoint: str, devices: Sequence[Device], threads: int,
                     cache_dir: str | None = None) -> None:
        """Serve `devices` at `endpoint` with llama.cpp's RPC server; returns only when the
        server could not start (its reason is on stdout)."""
        start = self._proc("ggml_backend_rpc_start_server", _START_SERVER)
        handles = (ctypes.c_void_p * len(devices))(*(d.handle for d in devices))
        start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads,
              len(devices), handles)

    def on_abort(self, callback: Any) -> None:
        """Call `callback(message)` when ggml aborts the process (its last words)."""

        @_ABORT_CALLBACK
        def hook(message: bytes) -> None:
            callback((message or b"").decode("utf-8", errors="replace"))

        self._abort_callback = hook  # kept alive: ggml keeps calling it
        self.fn.ggml_set_abort_callback(hook)


@cache
def ggml() -> GgmlRpc:
    """The bindings (loading llama_cpp on first use)."""
    return GgmlRpc()


def rpc_supported() -> bool:
    """Can this llama-cpp-python build lend and borrow over RPC?"""
    try:
        import llama_cpp
    except ImportError:
        return False
    if not llama_cpp.llama_supports_rpc():
        return False
    try:
        ggml().rpc_reg()
    except (RpcUnavailable, AttributeError, OSError):
        return False
    return True

