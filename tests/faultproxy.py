"""A small threaded TCP proxy for fault injection between an S3 client and a loopback S3 server.

Debian has no toxiproxy, and the failures a checkpoint writer must survive (a connection reset in the
middle of an upload, a server that stops answering, a slow link) are transport failures that no mock of
the S3 API can reproduce.  The proxy listens on 127.0.0.1 only, forwards to one upstream address, and
its behaviour can be switched while connections are open:

* ``passthrough()``: forward everything (the default);
* ``latency(seconds)``: sleep before forwarding every chunk, both directions;
* ``reset_after(nbytes, once=...)``: after ``nbytes`` more bytes of client->server ("upstream") traffic,
  abort the connection carrying them with a TCP RST; ``times=k`` does the same to the next k requests
  (a retry loop's worst luck); with ``once=False`` every later connection is reset on its first
  upstream byte too (an outage) until the mode is switched again;
* ``stall()``: keep connections open but forward nothing (a hung server);
* ``stall_for(seconds)``: the same for ``seconds``, then forward again, but never for a connection that
  carried a request during the stall (its bytes are read and dropped, as by a middlebox that lost its
  state): a client gets answers again only if it abandons a stalled connection and opens a new one.

It is bounded (``max_connections`` concurrent connections, daemon threads) and stops itself after
``lifetime_s`` so a forgotten proxy cannot outlive a test session.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

_POLL_S = 0.05


@dataclass
class ProxyStats:
    """Counters that let a test assert the fault really happened."""

    connections: int = 0
    rejected: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    stalled: int = 0  # connections black-holed by stall_for


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``upstream`` with switchable faults (see the module docstring)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        max_connections: int = 64,
        lifetime_s: float = 900.0,
        chunk: int = 64 * 1024,
    ) -> None:
        self.upstream = upstream
        self.max_connections = max_connections
        self.lifetime_s = lifetime_s
        self.chunk = chunk
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._mode = "pass"
        self._latency = 0.0
        self._reset_budget = 0
        self._reset_once = True
        self._resets_left = 1
        self._reset_nbytes = 0
        self._stop = threading.Event()
        self._blackhole = False  # the current stall kills the connections it catches (stall_for)
        self.stall_ended = threading.Event()
        self.stall_ended_at: float | None = None  # time.monotonic() when the last stall_for ended
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL_S * 4)
        self._acceptor: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._deadline = time.monotonic() + self.lifetime_s
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every proxied connection; idempotent."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            _close(s)
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout=2)
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=2)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- modes -------------------------------------------------------------------------------------

    def passthrough(self) -> None:
        with self._lock:
            self._mode, self._latency, self._blackhole = "pass", 0.0, False

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._mode, self._latency = "pass", float(seconds)

    def reset_after(self, nbytes: int, *, once: bool = True, times: int = 1) -> None:
        with self._lock:
            self._mode, self._reset_budget, self._reset_once = "reset", int(nbytes), once
            self._resets_left, self._reset_nbytes = int(times), int(nbytes)

    def stall(self) -> None:
        with self._lock:
            self._mode, self._blackhole = "stall", False

    def stall_for(self, seconds: float) -> None:
        """Stall every connection for ``seconds``; those that carried bytes meanwhile stay dead."""
        with self._lock:
            self._mode, self._blackhole = "stall", True
            self.stall_ended.clear()
            self.stall_ended_at = None

        def end() -> None:
            if self._stop.wait(seconds):
                return
            with self._lock:
                if self._mode == "stall" and self._blackhole:
                    self._mode, self._blackhole = "pass", False
                self.stall_ended_at = time.monotonic()
            self.stall_ended.set()

        threading.Thread(target=end, name="faultproxy-stall", daemon=True).start()

    @contextlib.contextmanager
    def cuts_now_and_then(self, every_s: float, nbytes: int) -> Iterator[None]:
        """While the block runs: every ``every_s`` one connection is cut ``nbytes`` into its request."""
        stop = threading.Event()

        def cut() -> None:
            while not stop.wait(every_s):
                if self.mode == "pass":
                    self.reset_after(nbytes, once=True)

        thread = threading.Thread(target=cut, name="faultproxy-cuts", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.passthrough()

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    # -- internals ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() > self._deadline:
                threading.Thread(target=self.stop, daemon=True).start()
                return
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                too_many = len(self._conns) >= 2 * self.max_connections
                if too_many:
                    self.stats.rejected += 1
                else:
                    self.stats.connections += 1
            if too_many:
                _close(client, rst=True)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client, rst=True)
                continue
            pair = _Pair(client, server)
            with self._lock:
                self._conns.update((client, server))
                self._threads = [t for t in self._threads if t.is_alive()]
            for src, dst, up in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up, pair), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, pair: _Pair) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([src], [], [], _POLL_S * 4)
                if not ready:
                    continue
                data = src.recv(self.chunk)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    if pair.finish():
                        self._abort(pair, rst=False)
                    return
                with self._lock:
                    if self._mode == "stall" and self._blackhole and not pair.dead:
                        pair.dead = True
                        self.stats.stalled += 1
                while self.mode == "stall" and not self._stop.is_set():
                    time.sleep(_POLL_S)
                if pair.dead:
                    continue  # read and dropped: this connection never answers again
                with self._lock:
                    delay = self._latency
                    cut = None
                    if up and self._mode == "reset":
                        if len(data) > self._reset_budget:
                            cut = self._reset_budget
                            self._reset_budget = 0
                            self.stats.resets += 1
                            self._resets_left -= 1
                            if self._resets_left > 0:
                                self._reset_budget = self._reset_nbytes
                            elif self._reset_once:
                                self._mode = "pass"
                        else:
                            self._reset_budget -= len(data)
                if delay:
                    time.sleep(delay)
                if cut is not None:
                    if cut:
                        dst.sendall(data[:cut])
                        self.stats.bytes_up += cut
                    self._abort(pair)
                    return
                dst.sendall(data)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        except (OSError, ValueError):  # ValueError: the other direction already closed the socket
            self._abort(pair)
        finally:
            if self._stop.is_set():
                self._abort(pair)

    def _abort(self, pair: _Pair, rst: bool = True) -> None:
        with self._lock:
            self._conns.discard(pair.client)
            self._conns.discard(pair.server)
        _close(pair.client, rst=rst)
        _close(pair.server, rst=rst)


class _Pair:
    """One proxied connection; closed for good when both directions have seen EOF."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self._lock = threading.Lock()
        self._eofs = 0
        self.dead = False  # caught by stall_for: forwards nothing, ever

    def finish(self) -> bool:
        with self._lock:
            self._eofs += 1
            return self._eofs == 2


def _close(sock: socket.socket, rst: bool = False) -> None:
    """Close a socket; with ``rst`` the peer sees ECONNRESET instead of a clean EOF."""
    try:
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
