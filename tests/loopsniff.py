"""When each SSE `token` event crossed the loopback interface, by TCP source port: the
kernel's receive timestamp of the packet that carried it (AF_PACKET on `lo`, root only).

A measuring aid for the web UI's latency figure — a token leaving the worker (its port) and
leaving the queen (its port) — with no change to either process.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import threading
import time

SO_TIMESTAMPNS = 35  # Linux; the ancillary data is a struct timespec
ETH_P_ALL = 0x0003
TOKEN = re.compile(rb'event: token\r?\ndata: \{[^\n]*?"i": (\d+)')


def can_sniff() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL)).close()
        return True
    except (PermissionError, AttributeError, OSError):
        return False


class TokenSniffer:
    """Records, for each watched source port, the first time each token index was seen."""

    def __init__(self, ports: set[int]) -> None:
        self.ports = ports
        self.seen: dict[int, dict[int, float]] = {p: {} for p in ports}
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TokenSniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.1)
            if not ready:
                continue
            data, ancdata, _flags, addr = self._sock.recvmsg(65535, 64)
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # on lo every packet shows twice: outgoing, then host
            at = time.time()
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    at = sec + nsec / 1e9
            self._packet(data, at)

    def _packet(self, frame: bytes, at: float) -> None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only
            return
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:  # TCP
            return
        tcp = ip[ihl:]
        src = struct.unpack("!H", tcp[:2])[0]
        if src not in self.ports:
            return
        payload = tcp[(tcp[12] >> 4) * 4:]
        for m in TOKEN.finditer(payload):
            self.seen[src].setdefault(int(m.group(1)), at)
