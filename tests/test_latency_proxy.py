"""The latency proxy (mailgov.testing.latency) between real sockets, no mocks.

Each test starts a small threaded TCP server on 127.0.0.1 (an echo server, optionally
sending a greeting first) and talks to it through a ``LatencyProxy`` with plain sockets.
Timing assertions have a deterministic lower bound (the proxy must never deliver early)
and a generous upper bound (the machine may be loaded). Every socket operation has a
timeout, so a broken proxy fails a test instead of hanging the suite. No database.
"""

from __future__ import annotations

import contextlib
import queue
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgov.testing.latency import LatencyProxy, ProxyStats

TIMEOUT = 5.0  # seconds, for every socket operation
SLACK = 0.05  # seconds a loaded machine may add to an expected duration
EARLY = 0.001  # seconds a timing may fall short of its bound (clocks differ)


class PeerServer:
    """A threaded TCP server: sends ``greeting`` on accept, then echoes (or closes).

    Created bound but not listening when ``listen=False``: connections to it are then
    refused until ``listen()``. It waits ``greeting_delay`` seconds after accepting (a
    reset sooner may reach the other side before its ``connect()`` has returned, which
    then fails). With ``reset=True`` it closes with a reset (RST) instead of a FIN. With
    ``echo=False`` it reads without answering, and puts what each connection sent and
    how it ended (:func:`read_until_closed`) on ``received``.
    """

    def __init__(
        self,
        greeting: bytes = b"",
        *,
        close_after_greeting: bool = False,
        reset: bool = False,
        greeting_delay: float = 0.0,
        echo: bool = True,
        listen: bool = True,
        split: int = 1,
    ) -> None:
        self.greeting = greeting
        self.split = split
        self.close_after_greeting = close_after_greeting
        self.reset = reset
        self.greeting_delay = greeting_delay
        self.echo = echo
        self.received: queue.Queue[tuple[bytes, str]] = queue.Queue()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.host, self.port = self._sock.getsockname()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        if listen:
            self.listen()

    def listen(self) -> None:
        self._sock.listen()
        self._sock.settimeout(0.05)  # the accept loop polls for stop()
        self._spawn(self._accept_loop)

    def stop(self) -> None:
        self._closing.set()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in another thread
        for thread in self._threads:
            thread.join(TIMEOUT)
        self._sock.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            time.sleep(self.greeting_delay)
            if self.greeting:
                conn.sendall(self.greeting)
            if self.close_after_greeting:
                if self.reset:
                    reset_on_close(conn)
                return
            if not self.echo:
                self.received.put(read_until_closed(conn))
                return
            while data := conn.recv(65536):
                # ``split`` writes per echo, as a server answers a pipelined
                # flight one reply at a time.
                step = -(-len(data) // self.split)
                for start in range(0, len(data), step):
                    conn.sendall(data[start : start + step])
                    if self.split > 1:
                        time.sleep(0.0005)
            conn.shutdown(socket.SHUT_WR)


@pytest.fixture
def echo_server() -> Iterator[PeerServer]:
    server = PeerServer()
    yield server
    server.stop()


def connect(proxy: LatencyProxy) -> socket.socket:
    client = socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            raise AssertionError(f"EOF after {len(received)} of {size} bytes")
        received += chunk
    return bytes(received)


def exchange(sock: socket.socket, message: bytes = b"ping\r\n") -> float:
    """Send a request, wait for its whole echo, return the seconds it took."""
    started = time.perf_counter()
    sock.sendall(message)
    assert recv_exactly(sock, len(message)) == message
    return time.perf_counter() - started


def reset_on_close(sock: socket.socket) -> None:
    """Make ``close()`` abort the connection: the peer gets a reset (RST), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the peer sent, and how the connection ended: ``"eof"`` or ``"reset"``."""
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "eof"


def is_closed(sock: socket.socket) -> bool:
    """True once the peer has closed: EOF or a reset, within the timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("LatencyProxy")]


# --- bytes ------------------------------------------------------------------------------


def test_bytes_pass_both_ways_unchanged_and_in_order(echo_server: PeerServer) -> None:
    rng = random.Random(1)
    payload = rng.randbytes(1024 * 1024)
    with LatencyProxy(echo_server.host, echo_server.port, 0.005) as proxy, connect(proxy) as c:

        def send() -> None:
            # Many writes of random sizes, then a half-close that the proxy must forward.
            offset = 0
            while offset < len(payload):
                size = rng.randint(1, 20000)
                c.sendall(payload[offset : offset + size])
                offset += size
            c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        echoed = recv_exactly(c, len(payload))
        sender.join(TIMEOUT)
        assert echoed == payload
        # The echo server answers our EOF by closing; the proxy forwards that EOF last.
        assert c.recv(1) == b""
        stats = proxy.stats
    assert stats.bytes_up == stats.bytes_down == len(payload)
    assert stats.connections == 1


# --- timing -----------------------------------------------------------------------------


def test_a_round_trip_costs_two_delays_and_the_proxy_adds_little(
    echo_server: PeerServer,
) -> None:
    delay = 0.02
    with LatencyProxy(echo_server.host, echo_server.port, delay) as proxy, connect(proxy) as c:
        exchange(c)  # pays for connection setup
        delayed = [exchange(c) for _ in range(10)]
        assert min(delayed) >= 2 * delay - EARLY
        assert statistics.median(delayed) < 2 * delay + SLACK

        proxy.delay = 0  # applies to data read from now on
        undelayed = [exchange(c) for _ in range(10)]
        assert statistics.median(undelayed) < delay


def test_a_pipelined_flight_costs_one_round_trip(echo_server: PeerServer) -> None:
    # Long enough that the whole flight leaves before its first echo comes
    # back, even on a machine that stalls the sending thread for a while.
    delay = 0.25
    messages = [b"RCPT TO:<user%02d@example.com>\r\n" % i for i in range(20)]
    expected = b"".join(messages)
    with LatencyProxy(echo_server.host, echo_server.port, delay) as proxy, connect(proxy) as c:
        exchange(c)
        proxy.reset_stats()
        started = time.perf_counter()
        for message in messages:
            c.sendall(message)
            # Apart enough for the proxy to read separate chunks (a delay per chunk would
            # show), close enough that the whole flight leaves before the first echo.
            time.sleep(0.001)
        sending = time.perf_counter() - started
        echoed = recv_exactly(c, len(expected))
        elapsed = time.perf_counter() - started
        stats = proxy.stats

    assert echoed == expected
    assert elapsed >= 2 * delay - EARLY
    # One round trip for the flight, far below the 20 round trips (2 s) of a proxy that
    # delayed each chunk after the one before it.
    assert elapsed < sending + 2 * delay + 2 * SLACK
    assert stats == ProxyStats(
        connections=0,
        round_trips=1,
        bytes_up=len(expected),
        bytes_down=len(expected),
        flights_up=1,
        flights_down=1,
    )


@pytest.mark.parametrize("connect_round_trips", [0, 1, 2])
def test_a_greeting_arrives_after_the_handshake_and_one_delay(connect_round_trips: int) -> None:
    delay = 0.02
    greeting = b"220 mail.example.com ESMTP ready\r\n"
    server = PeerServer(greeting)
    try:
        with LatencyProxy(
            server.host, server.port, delay, connect_round_trips=connect_round_trips
        ) as proxy:
            started = time.perf_counter()
            with connect(proxy) as c:
                first = c.recv(1)
                elapsed = time.perf_counter() - started
                assert first + recv_exactly(c, len(greeting) - 1) == greeting
                # The greeting is connection setup, not a round trip of its own.
                assert proxy.stats == ProxyStats(
                    connections=1,
                    round_trips=connect_round_trips,
                    bytes_down=len(greeting),
                    flights_down=1,
                )
                exchange(c, b"EHLO client.example.com\r\n")
                assert proxy.stats.round_trips == connect_round_trips + 1
    finally:
        server.stop()
    expected = (2 * connect_round_trips + 1) * delay
    assert expected - EARLY <= elapsed < expected + 2 * SLACK


# --- counting ---------------------------------------------------------------------------


def test_replies_written_back_to_back_arrive_together() -> None:
    """A server answering a pipelined flight writes one reply after another:
    they reach the client one delay after they left, all of them, not held
    back by Nagle's algorithm waiting for the client's delayed ACK (~40 ms)."""
    server = PeerServer(split=3)
    delay = 0.02
    try:
        with (
            LatencyProxy(server.host, server.port, delay=delay) as proxy,
            contextlib.closing(connect(proxy)) as client,
        ):
            exchange(client, b"a\r\nb\r\nc\r\n")  # the connection set up
            times = [exchange(client, b"a\r\nb\r\nc\r\n") for _ in range(5)]
    finally:
        server.stop()
    assert min(times) >= 2 * delay - EARLY
    assert statistics.median(times) < 2 * delay + 0.025, times


def test_strict_exchanges_count_one_round_trip_each(echo_server: PeerServer) -> None:
    with LatencyProxy(echo_server.host, echo_server.port, 0.002, connect_round_trips=2) as proxy:
        with connect(proxy) as c:
            for _ in range(5):
                exchange(c)
        with connect(proxy) as c:
            for _ in range(3):
                exchange(c)
        stats = proxy.stats
        assert stats.connections == 2
        assert stats.round_trips == 2 * 2 + 5 + 3
        assert stats.flights_up == stats.flights_down == 5 + 3

        proxy.reset_stats()
        assert proxy.stats == ProxyStats()


# --- closing and failures ---------------------------------------------------------------


def test_a_server_close_reaches_the_client_after_its_data() -> None:
    server = PeerServer(b"421 4.3.2 Service shutting down\r\n", close_after_greeting=True)
    try:
        with LatencyProxy(server.host, server.port, 0.01) as proxy, connect(proxy) as c:
            received = bytearray()
            while chunk := c.recv(1024):
                received += chunk
            assert bytes(received) == server.greeting
    finally:
        server.stop()


def test_a_server_reset_reaches_the_client_after_its_data() -> None:
    """A server that writes a reply and aborts (RST): the client reads the reply, then
    the reset, as on a direct connection; the proxy must not drop what it still holds
    (at 50 ms the reply is in the proxy when the reset comes)."""
    delay = 0.05
    # Reply and reset while the proxy still charges the handshake (2 * delay): both wait
    # in the proxy's socket when it starts forwarding.
    server = PeerServer(
        b"421 4.3.2 Service shutting down\r\n",
        close_after_greeting=True,
        reset=True,
        greeting_delay=0.02,
    )
    try:
        with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as c:
            direct = read_until_closed(c)
        with LatencyProxy(server.host, server.port, delay) as proxy:
            started = time.perf_counter()
            with connect(proxy) as c:
                proxied = read_until_closed(c)
            elapsed = time.perf_counter() - started
            stats = proxy.stats
    finally:
        server.stop()
    assert direct == (server.greeting, "reset")
    assert proxied == direct
    # The reply, and the reset after it, no sooner than the handshake and one delay.
    assert elapsed >= 3 * delay - EARLY
    assert stats == ProxyStats(
        connections=1, round_trips=1, bytes_down=len(server.greeting), flights_down=1
    )


def test_a_client_reset_reaches_the_server_after_its_data() -> None:
    delay = 0.05
    request = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    server = PeerServer(echo=False)

    def send_and_reset(port: int) -> tuple[bytes, str]:
        with socket.create_connection((server.host, port), timeout=TIMEOUT) as c:
            c.sendall(request)
            reset_on_close(c)
        return server.received.get(timeout=TIMEOUT)

    try:
        direct = send_and_reset(server.port)
        with LatencyProxy(server.host, server.port, delay) as proxy:
            proxied = send_and_reset(proxy.port)
            stats = proxy.stats
    finally:
        server.stop()
    assert direct == (request, "reset")
    assert proxied == direct
    assert stats == ProxyStats(connections=1, round_trips=1, bytes_up=len(request), flights_up=1)


def test_a_write_to_a_closed_server_resets_the_client_after_the_eof() -> None:
    """The server replies and closes; the client writes on: the server's kernel resets
    the proxy's connection, and the proxy passes that reset on to the client after the
    reply and the end of file, so the client's writes fail as on a direct connection
    (where the first write after the reset fails; here a later one, as the proxy sees
    the reset only when it writes)."""
    delay = 0.02
    server = PeerServer(b"421 4.3.2 Service shutting down\r\n", close_after_greeting=True)
    try:
        with LatencyProxy(server.host, server.port, delay) as proxy, connect(proxy) as c:
            assert read_until_closed(c) == (server.greeting, "eof")
            with pytest.raises((BrokenPipeError, ConnectionResetError)):  # noqa: PT012
                for _ in range(10):
                    c.sendall(b"QUIT\r\n")
                    time.sleep(4 * delay)
    finally:
        server.stop()


def test_a_reset_waits_for_data_the_client_is_slow_to_read() -> None:
    """Megabytes the proxy has read reach a client that reads late, then the reset:
    the proxy resets only once its own send queue is empty (an abort with data still
    queued in the kernel would discard it)."""
    payload = random.Random(2).randbytes(8 * 1024 * 1024)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    read_by_proxy = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)
            # Reset only once the proxy has read it all: our own abort would discard
            # what our kernel still holds.
            read_by_proxy.wait(TIMEOUT)
            reset_on_close(conn)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with (
            LatencyProxy("127.0.0.1", listener.getsockname()[1], 0.005) as proxy,
            connect(proxy) as c,
        ):
            deadline = time.monotonic() + TIMEOUT
            while proxy.stats.bytes_down < len(payload) and time.monotonic() < deadline:
                time.sleep(0.01)
            read_by_proxy.set()
            time.sleep(0.2)  # the reset is due at the proxy, the client has read nothing
            received, ending = read_until_closed(c)
    finally:
        read_by_proxy.set()
        server.join(TIMEOUT)
        listener.close()
    assert len(received) == len(payload)
    assert received == payload
    assert ending == "reset"


def test_stop_closes_open_connections_and_leaves_no_thread(echo_server: PeerServer) -> None:
    assert not proxy_threads()
    proxy = LatencyProxy(echo_server.host, echo_server.port, 0.005).start()
    assert proxy.running
    assert len(proxy_threads()) == 1
    clients = [connect(proxy) for _ in range(3)]
    try:
        for c in clients:
            exchange(c)
        proxy.delay = 2.0  # leaves data queued inside the proxy when it stops
        clients[0].sendall(b"in flight\r\n")
        time.sleep(0.05)
        started = time.perf_counter()
        proxy.stop()
        assert time.perf_counter() - started < 1.0
        assert not proxy.running
        assert not proxy_threads()
        for c in clients:
            assert is_closed(c)
        proxy.stop()  # idempotent
    finally:
        for c in clients:
            c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT)


def test_a_refused_target_drops_the_client_and_the_proxy_keeps_serving() -> None:
    server = PeerServer(listen=False)  # bound but not listening: connections are refused
    try:
        with LatencyProxy(server.host, server.port, 0.005) as proxy:
            with connect(proxy) as c:
                assert is_closed(c)
            server.listen()
            with connect(proxy) as c:
                exchange(c)
            assert proxy.stats.connections == 2
    finally:
        server.stop()


def test_start_raises_when_the_address_is_taken(echo_server: PeerServer) -> None:
    proxy = LatencyProxy(echo_server.host, echo_server.port, port=echo_server.port)
    with pytest.raises(OSError):
        proxy.start()
    assert not proxy.running
    assert not proxy_threads()
    proxy.stop()  # nothing to stop


@pytest.mark.parametrize("delay", [-0.001, float("nan"), float("inf")])
def test_a_delay_must_be_a_finite_non_negative_number(delay: float) -> None:
    with pytest.raises(ValueError, match="delay"):
        LatencyProxy("127.0.0.1", 25, delay)


# --- command line -----------------------------------------------------------------------


def test_command_line_proxies_until_interrupted(echo_server: PeerServer) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailgov.testing.latency",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"{echo_server.host}:{echo_server.port}",
            "--delay-ms",
            "1",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("Latency proxy listening on 127.0.0.1:"), line
        port = int(line.split()[4].rstrip(",").rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
            exchange(c)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "round_trips=2" in output  # the handshake and the exchange
