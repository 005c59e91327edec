"""The latency proxy (mailgov.testing.latency) between real sockets, no mocks.

Each test starts a small threaded TCP server on 127.0.0.1 (an echo server, optionally
sending a greeting first) and talks to it through a ``LatencyProxy`` with plain sockets.
Timing assertions have a deterministic lower bound (the proxy must never deliver early)
and a generous upper bound (the machine may be loaded). Every socket operation has a
timeout, so a broken proxy fails a test instead of hanging the suite. No database.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import statistics
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
    refused until ``listen()``.
    """

    def __init__(
        self,
        greeting: bytes = b"",
        *,
        close_after_greeting: bool = False,
        listen: bool = True,
        split: int = 1,
    ) -> None:
        self.greeting = greeting
        self.split = split
        self.close_after_greeting = close_after_greeting
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
            if self.greeting:
                conn.sendall(self.greeting)
            if self.close_after_greeting:
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
    delay = 0.05
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
