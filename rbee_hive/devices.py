"""What this host can run on: CUDA devices through NVML, Metal on Apple silicon, the CPU.

No driver means no CUDA backend, with the reason, never a crash.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

from rbee_common.fit import ram_limit
from worker.launch import build_backends


def _meminfo() -> tuple[int | None, int | None]:
    """Total and available RAM in bytes."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return fields.get("MemTotal"), fields.get("MemAvailable", fields.get("MemFree"))
    except OSError:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None, None
    return total, _darwin_available(total)


def _darwin_available(total: int) -> int | None:
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page = 16384 if "page size of 16384" in out else 4096
    pages = 0
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
            pages += int(value.strip().rstrip(".") or 0)
    return min(pages * page, total)


def _cuda() -> tuple[list[dict[str, Any]], str | None]:
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return [], f"NVML: {e}"
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            devices.append({
                "backend": "cuda", "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_total": int(mem.total), "memory_free": int(mem.free),
                "memory_limit": None,
            })
        return devices, None if devices else "NVML found no devices"
    except pynvml.NVMLError as e:
        return [], f"NVML: {e}"
    finally:
        pynvml.nvmlShutdown()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect() -> dict[str, Any]:
    """Backends (available or why not) and devices with their memory, total and free."""
    build = build_backends()
    total, available = _meminfo()
    devices: list[dict[str, Any]] = [{
        "backend": "cpu", "index": 0, "name": _cpu_name(), "cores": os.cpu_count(),
        "memory_total": total, "memory_free": available, "memory_limit": ram_limit(),
    }]
    cuda_devices, cuda_reason = _cuda()
    devices += cuda_devices
    if cuda_devices and not build["cuda"]:
        cuda_reason = "llama-cpp-python was built without CUDA"
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple:
        devices.append({"backend": "metal", "index": 0, "name": "Apple GPU (unified memory)",
                        "memory_total": total, "memory_free": available,
                        "memory_limit": ram_limit()})
    metal_reason = None
    if not apple:
        metal_reason = "Metal needs macOS on Apple silicon"
    elif not build["metal"]:
        metal_reason = "llama-cpp-python was built without Metal"
    backends = [
        {"name": "cpu", "available": build["cpu"],
         "reason": None if build["cpu"] else "llama-cpp-python is not installed"},
        {"name": "cuda", "available": cuda_reason is None, "reason": cuda_reason},
        {"name": "metal", "available": metal_reason is None, "reason": metal_reason},
    ]
    return {"backends": backends, "devices": devices}


def find_device(inventory: dict[str, Any], backend: str, index: int) -> dict[str, Any] | None:
    for d in inventory["devices"]:
        if d["backend"] == backend and d["index"] == index:
            return d
    return None


def backend_reason(inventory: dict[str, Any], backend: str) -> str | None:
    """None when `backend` can run here, else why not."""
    for b in inventory["backends"]:
        if b["name"] == backend:
            return None if b["available"] else str(b["reason"])
    return f"unknown backend {backend!r} (cpu, cuda or metal)"


def require_devices(inventory: dict[str, Any], backend: str, indexes: list[int],
                    purpose: str) -> list[dict[str, Any]]:
    """The inventory entries of these devices of `backend`; BACKEND_UNAVAILABLE (with the
    devices there are) when the backend cannot run here or a device is not here."""
    from worker.errors import BackendUnavailable

    reason = backend_reason(inventory, backend)
    if reason is not None:
        hint = None if "built without" in reason else (
            f"See `rbee-hive detect`; {purpose} it lists as available.")
        raise BackendUnavailable(f"backend {backend!r} is not available on this host: {reason}",
                                 hint=hint)
    found = []
    for index in indexes:
        dev = find_device(inventory, backend, index)
        if dev is None:
            have = ", ".join(f"{d['backend']}:{d['index']}" for d in inventory["devices"])
            raise BackendUnavailable(f"there is no {backend} device {index} on this host",
                                     hint=f"Devices here: {have}.")
        found.append(dev)
    return found
