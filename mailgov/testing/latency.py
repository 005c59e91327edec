"""A TCP proxy that adds network latency, for tests and benchmarks (standard library only).

Local peers answer in microseconds, so a client that pays a round trip per command looks
as fast as one that pipelines. :class:`LatencyProxy` puts a link with a one-way ``delay``
between a client and a target server, so that latency, not bandwidth, dominates as it
does on a real network, and counts the round trips the client paid for::

    with LatencyProxy("127.0.0.1", smtp_port, delay=0.010) as proxy:
        send_through("127.0.0.1", proxy.port)
        print(proxy.stats.round_trips)

Contract:

- **Delay, in order.** Every chunk read from one side is written to the other side
  ``delay`` seconds after it was read, never sooner, and never reordered (one FIFO per
  direction, each chunk stamped with its due time). Writes the client sends back to back
  (a pipelined SMTP flight) therefore all arrive about one delay later, not one delay
  each. There is no bandwidth limit: what is in flight is buffered without bound.
- **Changing the delay** while running is allowed; it applies to data read afterwards.
  A chunk never overtakes an earlier one, so shortening the delay takes effect once the
  data read before the change has gone out.
- **Connection setup.** The client's ``connect()`` to the proxy returns at once, so the
  proxy charges the handshake afterwards: it opens the upstream connection at once but
  forwards nothing, either way, until ``connect_round_trips * 2 * delay`` after it
  accepted (TCP's SYN and SYN-ACK). A server greeting therefore reaches the client
  ``(2 * connect_round_trips + 1) * delay`` after connect: 1.5 round trips by default.
- **Half-close and close.** An end of file from one side is forwarded after the data
  queued before it, with the same delay, as a half-close (``shutdown(SHUT_WR)``); once
  both directions have ended, both sockets are closed.
- **Resets.** An error reading from one side (a reset, ``ECONNRESET``) is forwarded like
  an end of file: after the data read before it, with the same delay, as a reset (RST)
  of the other side, which therefore reads that data and then ``ECONNRESET``, as it
  would on a direct connection. The proxy sends the RST only once its send queue to
  that side is empty (on Linux; elsewhere once the data is in the kernel). Data queued
  the other way, toward the side that failed, is dropped, as that side's kernel would
  drop it. An error writing to a side means the same as reading one: a reset passed
  on after what the proxy read from that side (its end of file included). Either way
  the connection is over once the reset is delivered.
- **Refused.** A target that refuses the connection makes the proxy drop the client's
  connection, after the handshake time; the proxy goes on serving.
- **Lifecycle.** ``start()`` binds in the caller's thread (a bind error is raised there)
  and serves from one asyncio event loop in a daemon thread; ``stop()`` closes the
  listener and every connection, and joins the thread: nothing keeps running after it.

Statistics (:class:`ProxyStats`, a snapshot taken under a lock) count request/response
*turns as seen at the proxy*, which is what an SMTP client pays for. Data is attributed
when the proxy reads it:

- a **flight** is a maximal run of chunks in one direction on one connection
  (``flights_up`` client to server, ``flights_down`` server to client);
- a **round trip** is a downstream flight that follows an upstream one, plus
  ``connect_round_trips`` per connection for the handshake. A server greeting is a
  downstream flight with no upstream flight before it: it is part of connection setup,
  not a round trip of its own.

So an SMTP session that sends EHLO, MAIL, RCPT, DATA, the message and QUIT one command
at a time counts 1 + 6 round trips; with PIPELINING (MAIL, RCPT and DATA in one flight)
it counts 1 + 4.

Run it as a program in front of a real server::

    python -m mailgov.testing.latency --listen 127.0.0.1:2525 \\
        --target smtp.example.com:587 --delay-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import signal
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import TracebackType

if sys.platform != "win32":
    import fcntl

__all__ = ["LatencyProxy", "ProxyStats", "main"]

logger = logging.getLogger(__name__)

# Read size per chunk: large enough that bulk data costs few wake-ups.
READ_SIZE = 64 * 1024

_UP = "up"  # client to server
_DOWN = "down"  # server to client

# Queued after a side's data when reading from it failed: reset the other side there.
_RESET = None

# <linux/sockios.h>: the bytes of a socket's send queue not sent yet.
_SIOCOUTQNSD = 0x894B

_thread_numbers = itertools.count(1)


@dataclass(frozen=True)
class ProxyStats:
    """Counters of a :class:`LatencyProxy` since it was created or ``reset_stats()`` last ran.

    ``round_trips`` includes ``connect_round_trips`` per accepted connection; bytes and
    flights are counted when the proxy reads them (see the module docstring).
    """

    connections: int = 0
    round_trips: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    flights_up: int = 0
    flights_down: int = 0


_STAT_NAMES = tuple(field.name for field in fields(ProxyStats))


class _Turns:
    """Which way the last chunk of one connection went (touched by the loop thread only)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: str | None = None


class _Direction:
    """One direction of one connection: the chunks read from one side, each with its
    due time, to be written to the other (touched by the loop thread only).

    A chunk is data, ``b""`` for an end of file, or ``_RESET``; nothing follows the
    last two.
    """

    __slots__ = ("ended", "forwarding", "name", "queue")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        # How the source's side ended, once its reader has queued it: "eof" or "reset".
        self.ended: str | None = None
        # The task writing the queue to the other side.
        self.forwarding: asyncio.Task[None] | None = None


class _ConnectionReset(Exception):
    """A reset was passed on: the connection is over."""


class LatencyProxy:
    """A TCP proxy that delays each direction by a one-way delay, keeping byte order."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay: float = 0.010,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_round_trips: int = 1,
    ) -> None:
        if connect_round_trips < 0:
            raise ValueError(f"connect_round_trips must be >= 0, not {connect_round_trips!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.host = host
        self.port = port
        self.connect_round_trips = connect_round_trips
        self._stats_lock = threading.Lock()
        self._counters = dict.fromkeys(_STAT_NAMES, 0)
        self._lifecycle_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        # Loop-thread state: the connection handlers, and the accepted sockets that no
        # transport owns yet (a handler cancelled before its first step closes nothing).
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted: set[socket.socket] = set()

    # -- configuration and statistics ----------------------------------------------------

    @property
    def delay(self) -> float:
        """The one-way delay in seconds; may be changed while running."""
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {value!r}")
        # A float assignment is atomic: the loop thread reads it for each chunk.
        self._delay = value

    @property
    def stats(self) -> ProxyStats:
        """A consistent snapshot of the counters."""
        with self._stats_lock:
            return ProxyStats(**self._counters)

    def reset_stats(self) -> None:
        """Set every counter to zero (connections already open keep being counted)."""
        with self._stats_lock:
            self._counters = dict.fromkeys(self._counters, 0)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, increment in increments.items():
                self._counters[name] += increment

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._thread is not None

    def start(self) -> LatencyProxy:
        """Bind the listener, start serving in a background thread and return ``self``.

        Raises ``OSError`` at once if the address cannot be bound, ``RuntimeError`` if
        already running. ``port`` holds the bound port afterwards.
        """
        with self._lifecycle_lock:
            if self._thread is not None:
                raise RuntimeError("LatencyProxy is already running")
            listener = _bind(self.host, self.port)
            try:
                self.port = listener.getsockname()[1]
                listener.setblocking(False)
                loop = asyncio.new_event_loop()
            except BaseException:
                listener.close()
                raise
            # Created here, not in the thread, so that stop() can always reach it; an
            # asyncio.Event binds to a loop only when first awaited.
            stopping = asyncio.Event()
            thread = threading.Thread(
                target=self._run,
                args=(loop, listener, stopping),
                name=f"LatencyProxy-{next(_thread_numbers)}",
                daemon=True,
            )
            self._loop, self._stopping, self._thread = loop, stopping, thread
            thread.start()
            return self

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread; idempotent."""
        with self._lifecycle_lock:
            thread, loop, stopping = self._thread, self._loop, self._stopping
            if thread is None or loop is None or stopping is None:
                return
            # The loop is closed already if the thread died; then there is nothing to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
            thread.join()
            self._thread = self._loop = self._stopping = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<LatencyProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port} "
            f"delay={self.delay * 1000:g}ms>"
        )

    # -- the loop thread -------------------------------------------------------------------

    def _run(
        self, loop: asyncio.AbstractEventLoop, listener: socket.socket, stopping: asyncio.Event
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(listener, stopping))
        except Exception:
            logger.exception("LatencyProxy stopped on an unexpected error")
        finally:
            listener.close()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _serve(self, listener: socket.socket, stopping: asyncio.Event) -> None:
        accepting = asyncio.create_task(self._accept(listener))
        try:
            await stopping.wait()
        finally:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            listener.close()
            # A handler may still be opening its connections: cancel until none is left.
            while self._tasks:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for sock in self._accepted:
                sock.close()
            self._accepted.clear()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # Out of file descriptors, say: keep serving the connections we have.
                logger.warning("LatencyProxy could not accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            # No Nagle: a link forwards each write as it comes. asyncio turns
            # Nagle off only for sockets created with proto=IPPROTO_TCP, and an
            # accepted socket has proto 0; left on, a reply written right after
            # another (a pipelined flight's answers) would wait ~40 ms for the
            # client's delayed ACK, a cost no network adds.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._accepted.add(client)
            task = loop.create_task(self._handle(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, client_sock: socket.socket) -> None:
        """Serve one client connection until both directions end, an error, or stop()."""
        loop = asyncio.get_running_loop()
        self._count(connections=1, round_trips=self.connect_round_trips)
        forwarding_at = loop.time() + self.connect_round_trips * 2 * self.delay
        writers: list[asyncio.StreamWriter] = []
        clean = False
        try:
            client_reader, client_writer = await asyncio.open_connection(
                sock=client_sock, limit=READ_SIZE
            )
            self._accepted.discard(client_sock)  # its transport owns it now
            writers.append(client_writer)
            # Nothing is read before forwarding starts: the kernel keeps data and a
            # reset in order, where a StreamReader that has failed drops the data it
            # holds (read() raises first).
            client_writer.transport.pause_reading()
            try:
                server_reader, server_writer = await asyncio.open_connection(
                    self.target_host, self.target_port, limit=READ_SIZE
                )
            except OSError as exc:
                logger.info(
                    "LatencyProxy could not reach %s:%s: %s",
                    self.target_host,
                    self.target_port,
                    exc,
                )
                # A refusal reaches a real client after the handshake's round trip.
                await _sleep_until(loop, forwarding_at)
                return
            writers.append(server_writer)
            server_writer.transport.pause_reading()
            upstream_sock = server_writer.get_extra_info("socket")
            if upstream_sock is not None:
                upstream_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _sleep_until(loop, forwarding_at)
            # The readers below await before the first read callback can run (both
            # are queued behind them), and from then on they always await.
            client_writer.transport.resume_reading()
            server_writer.transport.resume_reading()
            turns = _Turns()
            upstream, downstream = _Direction(_UP), _Direction(_DOWN)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(client_reader, upstream, turns))
                group.create_task(self._read(server_reader, downstream, turns))
                upstream.forwarding = group.create_task(
                    self._write(upstream, server_writer, downstream, client_writer)
                )
                downstream.forwarding = group.create_task(
                    self._write(downstream, client_writer, upstream, server_writer)
                )
            clean = True
        except* _ConnectionReset:
            # Passed on to one side, which is aborted already; the other side failed.
            logger.debug("LatencyProxy passed on a reset")
        except* (OSError, EOFError) as group:
            # Not expected (errors on the sockets are passed on as resets): drop both.
            logger.debug("LatencyProxy connection failed: %r", group.exceptions)
        finally:
            for writer in writers:
                if clean:
                    writer.close()
                else:
                    writer.transport.abort()
            for writer in writers:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            self._accepted.discard(client_sock)
            client_sock.close()

    async def _read(
        self, reader: asyncio.StreamReader, direction: _Direction, turns: _Turns
    ) -> None:
        """Stamp each chunk read with its due time and queue it, then the EOF or reset."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await reader.read(READ_SIZE)
            except OSError as exc:
                # A reset (or a failed write to this side, which asyncio reports here
                # too): after the data read before it, as a TCP peer sees a RST.
                logger.debug("LatencyProxy read %s failed: %r", direction.name, exc)
                direction.ended = "reset"
                direction.queue.put_nowait((loop.time() + self.delay, _RESET))
                return
            direction.queue.put_nowait((loop.time() + self.delay, chunk))
            if not chunk:
                direction.ended = "eof"
                return
            self._record(direction.name, len(chunk), turns)

    def _record(self, direction: str, size: int, turns: _Turns) -> None:
        new_flight = turns.last != direction
        if direction == _UP:
            self._count(bytes_up=size, flights_up=int(new_flight))
        else:
            # A reply flight answers the request flight before it; a greeting answers none.
            answered = new_flight and turns.last == _UP
            self._count(bytes_down=size, flights_down=int(new_flight), round_trips=int(answered))
        turns.last = direction

    async def _write(
        self,
        direction: _Direction,
        writer: asyncio.StreamWriter,
        reverse: _Direction,
        reverse_writer: asyncio.StreamWriter,
    ) -> None:
        """Write each queued chunk at its due time, in order; forward EOF as a half-close
        and a reset as a reset.

        ``reverse`` is the other direction, whose source is this one's destination (and
        ``reverse_writer`` writes to this one's source): a failed write passes a reset
        back that way.
        """
        loop = asyncio.get_running_loop()
        while True:
            due, chunk = await direction.queue.get()
            await _sleep_until(loop, due)
            if chunk is _RESET:
                await _reset(writer)
                raise _ConnectionReset
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            try:
                writer.write(chunk)
                await writer.drain()
            except OSError as exc:
                logger.debug("LatencyProxy write %s failed: %r", direction.name, exc)
                break
        # The destination is gone: drop what is queued for it. asyncio reports the
        # failure to its reader as well, which passes the reset on after the data it
        # read; unless that reader has ended already, with an end of file, which the
        # reverse writer then delivers before the reset.
        if reverse.ended != "eof":
            return
        due = loop.time() + self.delay
        if reverse.forwarding is not None:
            await reverse.forwarding
        await _sleep_until(loop, due)
        await _reset(reverse_writer)
        raise _ConnectionReset


async def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort ``writer``'s connection with a RST, once what was written to it has left.

    A close with ``SO_LINGER`` 0 sends a RST and discards the socket's send queue, so
    first wait for asyncio's buffer and (where the kernel says) the send queue to empty.
    """
    transport = writer.transport
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):  # gone already: nothing to deliver or reset
        transport.set_write_buffer_limits(0)
        await writer.drain()
        if sock is not None:
            while _unsent(sock):
                await asyncio.sleep(0.001)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _unsent(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue not sent yet; 0 where the kernel does not say."""
    if not sys.platform.startswith("linux"):
        return 0
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0" * 4))[0]


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    # A timer may fire a hair early; the delay is a lower bound, so check and sleep again.
    while (remaining := when - loop.time()) > 0:
        await asyncio.sleep(remaining)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound in the caller's thread so that errors surface at once."""
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address[:2], family=family)


# --- command line -----------------------------------------------------------------------


def _address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailgov.testing.latency",
        description="TCP proxy that delays each direction by a one-way delay.",
    )
    parser.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where clients connect (default 127.0.0.1 and a free port)",
    )
    parser.add_argument("--target", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--delay-ms", type=float, default=10.0, help="one-way delay (default 10, RTT 20)"
    )
    parser.add_argument(
        "--connect-round-trips",
        type=int,
        default=1,
        help="round trips charged for connection setup (default 1, TCP's handshake)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until SIGINT or SIGTERM, print its counters, return the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    (host, port), (target_host, target_port) = args.listen, args.target
    try:
        proxy = LatencyProxy(
            target_host,
            target_port,
            args.delay_ms / 1000,
            host=host,
            port=port,
            connect_round_trips=args.connect_round_trips,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop_requested = threading.Event()

    def _request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _request_stop)
    with proxy:
        print(
            f"Latency proxy listening on {proxy.host}:{proxy.port}, forwarding to "
            f"{target_host}:{target_port} with {args.delay_ms:g} ms each way",
            flush=True,
        )
        stop_requested.wait()
    print(proxy.stats, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
