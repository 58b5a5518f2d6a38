"""Which port a new worker listens on: the one asked for if free, else the first free one."""

from __future__ import annotations

import socket

from rbee_hive.errors import NoFreePort

PORT_RANGE = (8001, 8999)


def port_free(bind: str, port: int) -> bool:
    """Can a socket bind `port` on `bind` right now?"""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind, port))
        except OSError:
            return False
    return True


def pick_port(wanted: int | None, bind: str, taken: set[int]) -> int:
    """`wanted` if it is free, else the first free port of PORT_RANGE not in `taken`."""
    if wanted is not None:
        if wanted in taken or not port_free(bind, wanted):
            raise NoFreePort(f"port {wanted} on {bind} is in use",
                             hint="Leave out --port to let rbee-hive pick a free one.")
        return wanted
    low, high = PORT_RANGE
    for port in range(low, high + 1):
        if port not in taken and port_free(bind, port):
            return port
    raise NoFreePort(f"no free port in {low}–{high} on {bind}")
