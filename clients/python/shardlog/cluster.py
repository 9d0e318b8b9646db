"""A client of a cluster: an ordered list of independent shardlogd daemons.

    from shardlog import ClusterClient

    with ClusterClient(["a:7070", "b:7070", "c:7070"]) as c:
        ack = c.append(42, b"hello")            # on stream 42's home daemon
        records = c.read_stream(42).records

A stream's home is ``home_for(stream, shard_counts)`` (docs/PROTOCOL.md, "Cluster placement"):
the daemon is ``daemon_for(stream, len(addrs))``, which needs no connection, and the shard is
``shard_for`` over that daemon's shard count. A daemon is connected when a request first needs
it, so one that is down fails only its own streams, with :class:`DaemonUnavailable` naming it,
while the others keep serving. A connection that failed is dropped and the next request to that
daemon connects again. The list's order is placement: every client must use the same list in the
same order, and daemons are only ever appended to it.
"""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from shardlog.wire.AckLevel import AckLevel

from .client import Appended, Client, Payload, Records
from .errors import ConnectionClosed, ServerError, ShardlogError
from .placement import daemon_for, shard_for


class DaemonUnavailable(ShardlogError):
    """A daemon of the cluster could not be reached, or its connection broke. Only the streams
    whose home it is are affected."""

    def __init__(self, daemon: int, addr: str, cause: BaseException):
        self.daemon = daemon
        self.addr = addr
        self.cause = cause
        super().__init__(f"daemon {daemon} of the cluster ({addr}): {cause}")


class ClusterClient:
    """Blocking client of the daemons at ``addrs`` (in cluster order); one connection per daemon,
    opened on first use. A daemon's ``Error`` answer is raised as its
    :class:`~shardlog.errors.ServerError` subclass, as with :class:`~shardlog.Client`, with the
    daemon's index in ``.daemon``."""

    def __init__(
        self,
        addrs: Sequence[str],
        *,
        timeout: Optional[float] = 30.0,
        client_name: str = "shardlog-python-cluster",
    ):
        addrs = list(addrs)
        if not addrs:
            raise ValueError("a cluster needs at least one daemon address")
        if len(set(addrs)) != len(addrs):
            raise ValueError(f"a daemon is listed twice in {addrs}")
        self.addrs: List[str] = addrs
        self._timeout = timeout
        self._client_name = client_name
        self._conns: Dict[int, Client] = {}

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    def __enter__(self) -> "ClusterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def daemon_count(self) -> int:
        return len(self.addrs)

    def daemon_for(self, stream: int) -> int:
        """The index of the daemon that is home to ``stream`` (needs no connection)."""
        return daemon_for(stream, self.daemon_count)

    def home_for(self, stream: int) -> Tuple[int, int]:
        """``stream``'s home ``(daemon, shard)``; connects to the daemon to learn its shard count."""
        daemon = self.daemon_for(stream)
        return daemon, shard_for(stream, self.daemon(daemon).shard_count)

    def daemon(self, daemon: int) -> Client:
        """The connection to daemon ``daemon``, opened now if it is not open."""
        if not 0 <= daemon < self.daemon_count:
            raise IndexError(f"daemon {daemon} is not in a cluster of {self.daemon_count}")
        conn = self._conns.get(daemon)
        if conn is None:
            try:
                conn = Client(self.addrs[daemon], timeout=self._timeout, client_name=self._client_name)
            except (OSError, ConnectionClosed) as e:
                raise DaemonUnavailable(daemon, self.addrs[daemon], e) from e
            self._conns[daemon] = conn
        return conn

    def append(
        self,
        stream: int,
        payloads: Union[Payload, Sequence[Payload]],
        ack: int = AckLevel.Durable,
        timestamps: Optional[Sequence[Optional[int]]] = None,
    ) -> Optional[Appended]:
        """Appends to ``stream`` on its home daemon and waits for the answer (``None`` with
        ``AckLevel.None_``). If the daemon's connection breaks, the append may or may not be
        durable, as with one daemon; read the stream back to learn which."""
        daemon = self.daemon_for(stream)
        return self._on(daemon, lambda c: c.append(stream, payloads, ack, timestamps))

    def append_many(
        self,
        appends: Iterable[Tuple[int, Union[Payload, Sequence[Payload]]]],
        ack: int = AckLevel.Durable,
        window: int = 32,
    ) -> List[Optional[Appended]]:
        """Sends ``(stream, payloads)`` appends, each to its home, with up to ``window``
        unanswered per daemon, and returns their answers in the order given. Daemons work in
        parallel: one slow daemon does not hold back the sending to the others."""
        if window < 1:
            raise ValueError("window must be at least 1")
        results: List[Optional[Appended]] = []
        pending: Dict[int, List[Tuple[int, int]]] = {}  # daemon -> [(result index, request id)]

        def settle(daemon: int, upto: int) -> None:
            queue = pending.get(daemon, [])
            while len(queue) > upto:
                index, id_ = queue.pop(0)
                results[index] = self._on(daemon, lambda c: c.wait_appended(id_))

        for stream, payloads in appends:
            daemon = self.daemon_for(stream)
            settle(daemon, window - 1)
            id_ = self._on(daemon, lambda c: c.send_append(stream, payloads, ack))
            results.append(None)
            if ack != AckLevel.None_:
                pending.setdefault(daemon, []).append((len(results) - 1, id_))
        for daemon in list(pending):
            settle(daemon, 0)
        if ack == AckLevel.None_:
            self.sync()
        return results

    def sync(self) -> None:
        """:meth:`Client.sync` on every open connection: raises the first error kept for an
        ``AckLevel.None_`` append."""
        for daemon in sorted(self._conns):
            self._on(daemon, lambda c: c.sync())

    def read_stream(
        self,
        stream: int,
        from_lsn: int = 1,
        *,
        max_bytes: int = 1 << 20,
        max_wait_ms: int = 0,
    ) -> Records:
        """``stream``'s durable records from its home shard, from ``from_lsn``."""
        daemon, shard = self.home_for(stream)
        return self._on(
            daemon,
            lambda c: c.read(shard, from_lsn, max_bytes=max_bytes, max_wait_ms=max_wait_ms, stream=stream),
        )

    def read(self, daemon: int, shard: int, from_lsn: int = 1, **kwargs) -> Records:
        """A read of ``shard`` of daemon ``daemon`` (every stream); keywords as :meth:`Client.read`."""
        return self._on(daemon, lambda c: c.read(shard, from_lsn, **kwargs))

    def _on(self, daemon: int, f):
        conn = self.daemon(daemon)
        try:
            return f(conn)
        except ServerError as e:
            # The daemon answered; the connection is fine.
            e.daemon = daemon
            raise
        except (OSError, ConnectionClosed) as e:
            # socket.timeout is an OSError too: the connection's state is unknown, so drop it.
            self._conns.pop(daemon, None)
            conn.close()
            raise DaemonUnavailable(daemon, self.addrs[daemon], e) from e


__all__ = ["ClusterClient", "DaemonUnavailable"]
