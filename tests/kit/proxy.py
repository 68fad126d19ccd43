"""An in-process TCP fault proxy: sits between the agent and a broker and breaks the link on command.

    proxy = FaultProxy(upstream_port).start()   # the agent connects to proxy.port
    proxy.blackhole()   # every link, old and new, goes silent: nothing is read or forwarded
    proxy.heal()        # forward again (held links resume where they stopped, as TCP would)
    proxy.reset()       # RST every open link (SO_LINGER 0), both sides; new ones still pass
    proxy.refuse()      # RST every open link and close the listener: connecting gets ECONNREFUSED
    proxy.delay(200)    # forward each chunk 200 ms late

A blackhole is a partition, not a close: a silent link neither ends nor errs, so only the client's own
keepalive can notice it. Each link is two pump threads (one per direction) that poll with a short
timeout so that they see a mode change; closing a socket does not wake a thread blocked in recv, so
every close goes through shutdown(SHUT_RDWR) first.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

PASS, BLACKHOLE = "pass", "blackhole"
_POLL_S = 0.05


def _rst(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on, timeout 0."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(sock, shutdown=False)  # shutdown() would send a FIN first


def _close(sock: socket.socket, shutdown: bool = True) -> None:
    if shutdown:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One accepted client and its upstream connection (made lazily: a link accepted during a blackhole
    has none until the heal)."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        if not self.proxy._wait_passable(self.closed):
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.proxy.upstream_port), timeout=5)
        except OSError:
            self.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self.closed.is_set():  # reset while we were connecting
                _close(upstream)
                return
            self.upstream = upstream
        threading.Thread(target=self._pump, args=(upstream, self.client), daemon=True).start()
        self._pump(self.client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                if not self.proxy._wait_passable(self.closed):
                    return
                ready, _, _ = select.select([src], [], [], _POLL_S)
                if not ready or self.proxy.mode == BLACKHOLE:
                    continue  # a blackhole that began during select(): leave the data unread
                data = src.recv(65536)
                if not data:
                    break
                if self.proxy.delay_s:
                    time.sleep(self.proxy.delay_s)
                dst.sendall(data)
                self.proxy._count(len(data))
        except (OSError, ValueError):
            pass  # reset, refused or closed under us: the link is over
        self.close()

    def close(self, rst: bool = False) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            socks = (self.client, self.upstream)
        for s in socks:
            if s is not None:
                _rst(s) if rst else _close(s)
        self.proxy._forget(self)


class FaultProxy:
    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.mode = PASS
        self.delay_s = 0.0
        self._passable = threading.Condition()
        self._links: set[_Link] = set()
        self._links_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.accepted = 0  # connections accepted, ever: a client that reconnects shows up here
        self.forwarded_bytes = 0

    # lifecycle -------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._listen()
        return self

    def close(self) -> None:
        self._stop.set()
        self._unlisten()
        self.reset()
        with self._passable:
            self._passable.notify_all()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # faults --------------------------------------------------------------------------------------------
    def blackhole(self) -> None:
        self._set_mode(BLACKHOLE)

    def heal(self) -> None:
        """Forward again: listen if refused, end the delay, resume links held by a blackhole."""
        self.delay_s = 0.0
        if self._listener is None and not self._stop.is_set():
            self._listen()
        self._set_mode(PASS)

    def reset(self) -> int:
        """RST every open link (both sides); return how many. New connections still pass."""
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.close(rst=True)
        return len(links)

    def refuse(self) -> int:
        """Stop listening (new connections are refused) and RST every open link; heal() listens again."""
        self._unlisten()
        return self.reset()

    def delay(self, ms: float) -> None:
        self.delay_s = ms / 1000

    def links(self) -> int:
        with self._links_lock:
            return len(self._links)

    # internals ------------------------------------------------------------------------------------
    def _set_mode(self, mode: str) -> None:
        with self._passable:
            self.mode = mode
            self._passable.notify_all()

    def _wait_passable(self, closed: threading.Event) -> bool:
        """Block while blackholed; False when the link or the proxy closed meanwhile."""
        with self._passable:
            while self.mode == BLACKHOLE and not closed.is_set() and not self._stop.is_set():
                self._passable.wait(_POLL_S)
        return not closed.is_set() and not self._stop.is_set()

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]  # kept across refuse/heal so clients find us again
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), name=f"proxy-{self.port}", daemon=True).start()

    def _unlisten(self) -> None:
        with self._links_lock:  # after this, _accept registers no link from the old listener
            s, self._listener = self._listener, None
        if s is not None:
            _close(s)  # shutdown wakes the accept() below

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: refuse() or close()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client)
            with self._links_lock:
                if self._listener is not listener:  # accepted just as refuse() closed the listener
                    _rst(client)
                    return
                self._links.add(link)
                self.accepted += 1
            threading.Thread(target=link.run, daemon=True).start()

    def _forget(self, link: _Link) -> None:
        with self._links_lock:
            self._links.discard(link)

    def _count(self, n: int) -> None:
        self.forwarded_bytes += n  # a rough counter for tests; races only undercount
