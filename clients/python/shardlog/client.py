"""A blocking, pipelining client for shardlogd over TCP.

Every message is a frame: a 4-byte little-endian length, then one FlatBuffers ``Request`` (to the
daemon) or ``Response`` (from it), built and read with the code flatc generated from
``proto/schema/shardlog.fbs`` into ``shardlog.wire``. Requests carry an id; responses may come
back in any order, so they are matched by id, and a response that arrives while another is
awaited is kept until asked for. See docs/PROTOCOL.md for the bytes.
"""

import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import flatbuffers

import shardlog.wire.Append as _Append
import shardlog.wire.Hello as _Hello
import shardlog.wire.Ping as _Ping
import shardlog.wire.Read as _Read
import shardlog.wire.Record as _Record
import shardlog.wire.Request as _Request
import shardlog.wire.Stats as _Stats
from shardlog.wire.AckLevel import AckLevel
from shardlog.wire.Appended import Appended as _AppendedTable
from shardlog.wire.Error import Error as _ErrorTable
from shardlog.wire.HelloOk import HelloOk as _HelloOkTable
from shardlog.wire.Records import Records as _RecordsTable
from shardlog.wire.RequestBody import RequestBody
from shardlog.wire.Response import Response as _ResponseTable
from shardlog.wire.ResponseBody import ResponseBody
from shardlog.wire.StatsReply import StatsReply as _StatsReplyTable
from shardlog.wire.StatsReply import StatsReplyT

from .errors import ConnectionClosed, ProtocolError, ServerError, error_for
from .placement import shard_for

#: The protocol version this client speaks.
PROTOCOL_VERSION = 1
#: The daemon's default address.
ADDR_DEFAULT = "127.0.0.1:7070"
#: Largest response frame accepted. The daemon bounds a read by payload and scanned bytes, not
#: by the size of its answer, so a read over many small records can exceed the 4 MiB request
#: limit; this bound only guards against a corrupt length.
RESPONSE_FRAME_BYTES_MAX = 256 << 20
_HEADER = struct.Struct("<I")
_READ_CHUNK = 64 << 10

Payload = Union[bytes, bytearray, memoryview, str]


@dataclass(frozen=True)
class HelloOk:
    version: int
    server: str
    shard_count: int
    #: Shard-aware addresses indexed by shard id; empty when the daemon offers none.
    shard_addresses: List[str]


@dataclass(frozen=True)
class Appended:
    """The records of one append got lsns ``first_lsn .. first_lsn + count - 1`` on ``shard``."""

    shard: int
    first_lsn: int
    count: int

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + self.count - 1


@dataclass(frozen=True)
class ReadRecord:
    lsn: int
    stream: int
    payload: bytes
    #: The producer's timestamp, or ``None`` when it gave none.
    timestamp: Optional[int]


@dataclass(frozen=True)
class Records:
    shard: int
    #: The lsn to ask for next.
    next_lsn: int
    records: List[ReadRecord]


def _parse_addr(addr: str) -> Tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


def _as_bytes(p: Payload) -> bytes:
    return p.encode("utf-8") if isinstance(p, str) else bytes(p)


def _vector_bytes(tab, vtable_offset: int) -> bytes:
    """A ``[ubyte]`` field as bytes, in one slice (the generated accessor reads byte by byte)."""
    o = tab.Offset(vtable_offset)
    if o == 0:
        return b""
    start = tab.Vector(o)
    return bytes(tab.Bytes[start : start + tab.VectorLen(o)])


# vtable offsets of the [ubyte] payload fields (4 + 2 * field index in the schema).
_READ_RECORD_PAYLOAD = 8


class Client:
    """One connection to shardlogd.

    Simple calls (:meth:`append`, :meth:`read`, :meth:`stats`, :meth:`ping`) send one request
    and wait for its answer. For pipelining, :meth:`send_append` returns the request id at once
    and :meth:`wait` collects the answer later; :meth:`append_pipelined` does both with a window.
    A daemon ``Error`` is raised as the :class:`~shardlog.errors.ServerError` subclass of its
    code. Errors for appends sent with ``AckLevel.None_`` (which get no success answer) are
    kept; :meth:`sync` raises the first of them.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        addr: str = ADDR_DEFAULT,
        *,
        timeout: Optional[float] = 30.0,
        client_name: str = "shardlog-python",
        hello: bool = True,
    ):
        host, port = _parse_addr(addr)
        self.addr = addr
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._next_id = 1
        self._stash: Dict[int, Tuple[int, object]] = {}
        self._fire_and_forget: Set[int] = set()
        self._orphan_errors: List[ServerError] = []
        #: The daemon's ``HelloOk`` (``None`` if ``hello=False``).
        self.server_hello: Optional[HelloOk] = self.hello(client_name) if hello else None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def settimeout(self, timeout: Optional[float]) -> None:
        """Seconds to wait for an answer (``None``: forever); a longer wait raises ``socket.timeout``."""
        self._sock.settimeout(timeout)

    # ------------------------------------------------------------------ requests

    @property
    def shard_count(self) -> int:
        if self.server_hello is None:
            raise ValueError("no Hello was exchanged; call hello() first")
        return self.server_hello.shard_count

    def shard_for(self, stream: int) -> int:
        """The shard of this daemon that owns ``stream``."""
        return shard_for(stream, self.shard_count)

    def hello(self, client_name: str = "shardlog-python") -> HelloOk:
        b = flatbuffers.Builder(64)
        name = b.CreateString(client_name)
        _Hello.Start(b)
        _Hello.AddVersion(b, PROTOCOL_VERSION)
        _Hello.AddClientName(b, name)
        body = _Hello.End(b)
        t = self._expect(self.wait(self._send(b, RequestBody.Hello, body)), ResponseBody.HelloOk, _HelloOkTable)
        ok = HelloOk(
            version=t.Version(),
            server=(t.Server() or b"").decode("utf-8", "replace"),
            shard_count=t.ShardCount(),
            shard_addresses=[t.ShardAddresses(i).decode("utf-8") for i in range(t.ShardAddressesLength())],
        )
        self.server_hello = ok
        return ok

    def ping(self) -> float:
        """Round trip of one ``Ping``, in seconds."""
        started = time.perf_counter()
        b = flatbuffers.Builder(32)
        _Ping.Start(b)
        self._expect(self.wait(self._send(b, RequestBody.Ping, _Ping.End(b))), ResponseBody.Pong, None)
        return time.perf_counter() - started

    def stats(self) -> StatsReplyT:
        """The daemon's counters, as the generated object-API type (``front``, ``shards``, ...)."""
        b = flatbuffers.Builder(32)
        _Stats.Start(b)
        t = self._expect(self.wait(self._send(b, RequestBody.Stats, _Stats.End(b))), ResponseBody.StatsReply, _StatsReplyTable)
        return StatsReplyT.InitFromObj(t)

    def send_append(
        self,
        stream: int,
        payloads: Union[Payload, Sequence[Payload]],
        ack: int = AckLevel.Durable,
        timestamps: Optional[Sequence[Optional[int]]] = None,
    ) -> int:
        """Sends an append of one or more records to ``stream`` without waiting; returns its id.

        ``payloads`` is one payload or a sequence of them (bytes, or str as UTF-8). All records
        of one append land on one shard, get consecutive lsns and are committed atomically.
        """
        if isinstance(payloads, (bytes, bytearray, memoryview, str)):
            payloads = [payloads]
        records = [_as_bytes(p) for p in payloads]
        if not records:
            raise ValueError("an append needs at least one record")
        if timestamps is not None and len(timestamps) != len(records):
            raise ValueError("one timestamp (or None) per record")
        b = flatbuffers.Builder(128 + sum(len(r) + 32 for r in records))
        offsets = []
        for i, payload in enumerate(records):
            vec = b.CreateByteVector(payload)
            ts = timestamps[i] if timestamps is not None else None
            _Record.Start(b)
            _Record.AddPayload(b, vec)
            if ts is not None:
                _Record.AddTimestamp(b, ts)
                _Record.AddHasTimestamp(b, True)
            offsets.append(_Record.End(b))
        _Append.StartRecordsVector(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        vec = b.EndVector()
        _Append.Start(b)
        _Append.AddStream(b, stream)
        _Append.AddRecords(b, vec)
        _Append.AddAck(b, ack)
        id_ = self._send(b, RequestBody.Append, _Append.End(b))
        if ack == AckLevel.None_:
            self._fire_and_forget.add(id_)
        return id_

    def wait_appended(self, id_: int) -> Appended:
        """The answer to the append sent as ``id_`` (not for ``AckLevel.None_``)."""
        t = self._expect(self.wait(id_), ResponseBody.Appended, _AppendedTable)
        return Appended(shard=t.Shard(), first_lsn=t.FirstLsn(), count=t.Count())

    def append(
        self,
        stream: int,
        payloads: Union[Payload, Sequence[Payload]],
        ack: int = AckLevel.Durable,
        timestamps: Optional[Sequence[Optional[int]]] = None,
    ) -> Optional[Appended]:
        """Appends and waits for the answer; ``None`` with ``AckLevel.None_`` (no answer comes)."""
        id_ = self.send_append(stream, payloads, ack, timestamps)
        if ack == AckLevel.None_:
            return None
        return self.wait_appended(id_)

    def append_pipelined(
        self,
        appends: Iterable[Tuple[int, Union[Payload, Sequence[Payload]]]],
        ack: int = AckLevel.Durable,
        window: int = 32,
    ) -> Iterator[Optional[Appended]]:
        """Sends ``(stream, payloads)`` appends with up to ``window`` unanswered at once, and
        yields their answers in the order given (``None`` each with ``AckLevel.None_``, after
        a final :meth:`sync` has found no error)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        pending: Deque[int] = deque()
        for stream, payloads in appends:
            if len(pending) >= window:
                yield self.wait_appended(pending.popleft())
            id_ = self.send_append(stream, payloads, ack)
            if ack == AckLevel.None_:
                yield None
            else:
                pending.append(id_)
        while pending:
            yield self.wait_appended(pending.popleft())
        if ack == AckLevel.None_:
            self.sync()

    def sync(self) -> None:
        """Waits until the daemon has answered everything sent before (a ``Ping`` round trip),
        then raises the first error kept for an ``AckLevel.None_`` append, if any.

        Appends to different shards complete independently, so an error of such an append can
        still arrive after the ``Pong``; a later :meth:`sync` reports it."""
        self.ping()
        errors = self.take_errors()
        if errors:
            raise errors[0]

    def take_errors(self) -> List[ServerError]:
        """Errors received for requests nobody waits on (appends with ``AckLevel.None_``)."""
        errors, self._orphan_errors = self._orphan_errors, []
        return errors

    def read(
        self,
        shard: int,
        from_lsn: int = 1,
        *,
        max_bytes: int = 1 << 20,
        max_wait_ms: int = 0,
        stream: Optional[int] = None,
    ) -> Records:
        """Durable records of ``shard`` from ``from_lsn`` (only ``stream``'s when given).

        With ``max_wait_ms``, waits that long for a record when none is there yet (long-poll)."""
        b = flatbuffers.Builder(64)
        _Read.Start(b)
        _Read.AddShard(b, shard)
        _Read.AddFromLsn(b, from_lsn)
        _Read.AddMaxBytes(b, max_bytes)
        _Read.AddMaxWaitMs(b, max_wait_ms)
        if stream is not None:
            _Read.AddStream(b, stream)
            _Read.AddHasStream(b, True)
        t = self._expect(self.wait(self._send(b, RequestBody.Read, _Read.End(b))), ResponseBody.Records, _RecordsTable)
        records = []
        for i in range(t.RecordsLength()):
            r = t.Records(i)
            records.append(
                ReadRecord(
                    lsn=r.Lsn(),
                    stream=r.Stream(),
                    payload=_vector_bytes(r._tab, _READ_RECORD_PAYLOAD),
                    timestamp=r.Timestamp() if r.HasTimestamp() else None,
                )
            )
        return Records(shard=t.Shard(), next_lsn=t.NextLsn(), records=records)

    def tail(
        self,
        shard: int,
        from_lsn: int = 1,
        *,
        stream: Optional[int] = None,
        max_wait_ms: int = 1000,
        max_bytes: int = 1 << 20,
    ) -> Iterator[ReadRecord]:
        """Yields ``shard``'s records from ``from_lsn`` on, long-polling for new ones; it never
        ends by itself (stop iterating, or close the client). ``max_wait_ms`` must stay below
        the socket timeout."""
        while True:
            batch = self.read(shard, from_lsn, max_bytes=max_bytes, max_wait_ms=max_wait_ms, stream=stream)
            yield from batch.records
            from_lsn = max(from_lsn, batch.next_lsn)

    # ------------------------------------------------------------------ plumbing

    def _send(self, b: flatbuffers.Builder, body_type: int, body: int) -> int:
        id_ = self._next_id
        self._next_id += 1
        _Request.Start(b)
        _Request.AddId(b, id_)
        _Request.AddBodyType(b, body_type)
        _Request.AddBody(b, body)
        b.Finish(_Request.End(b))
        payload = b.Output()
        try:
            self._sock.sendall(_HEADER.pack(len(payload)) + payload)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed(f"sending to {self.addr}: {e}") from e
        return id_

    def wait(self, id_: int) -> Tuple[int, object]:
        """The answer to request ``id_`` as ``(ResponseBody tag, table)``, raising a daemon error."""
        if id_ in self._stash:
            return self._raise_error(self._stash.pop(id_))
        while True:
            rid, tag, table = self._read_response()
            if rid == id_:
                return self._raise_error((tag, table))
            if rid == 0 and tag == ResponseBody.Error:
                # An error about the connection (a bad frame, too many connections).
                return self._raise_error((tag, table))
            if rid in self._fire_and_forget:
                self._fire_and_forget.discard(rid)
                if tag == ResponseBody.Error:
                    self._orphan_errors.append(self._error(table))
                continue
            self._stash[rid] = (tag, table)

    @staticmethod
    def _error(table) -> ServerError:
        first = table.FirstAvailableLsn()
        return error_for(table.Code(), (table.Message() or b"").decode("utf-8", "replace"), first or None)

    def _raise_error(self, answer: Tuple[int, object]) -> Tuple[int, object]:
        tag, table = answer
        if tag == ResponseBody.Error:
            raise self._error(table)
        return answer

    @staticmethod
    def _expect(answer: Tuple[int, object], tag: int, cls):
        got, table = answer
        if got != tag:
            raise ProtocolError(f"expected response type {tag}, got {got}")
        return table

    def _read_response(self) -> Tuple[int, int, object]:
        payload = self._read_frame()
        try:
            resp = _ResponseTable.GetRootAs(payload, 0)
            tag = resp.BodyType()
            body = resp.Body()
            if body is None:
                raise ProtocolError("response without a body")
            cls = _BODY_TABLES.get(tag)
            if cls is None:
                raise ProtocolError(f"unknown response type {tag}")
            table = None
            if cls is not False:
                table = cls()
                table.Init(body.Bytes, body.Pos)
            return resp.Id(), tag, table
        except ProtocolError:
            raise
        except Exception as e:  # the generated readers raise struct/index errors on bad bytes
            raise ProtocolError(f"undecodable response: {e!r}") from e

    def _read_frame(self) -> bytes:
        while True:
            if len(self._buf) >= _HEADER.size:
                (n,) = _HEADER.unpack_from(self._buf)
                if n == 0 or n > RESPONSE_FRAME_BYTES_MAX:
                    raise ProtocolError(f"response frame length {n} is out of range")
                if len(self._buf) >= _HEADER.size + n:
                    payload = bytes(self._buf[_HEADER.size : _HEADER.size + n])
                    del self._buf[: _HEADER.size + n]
                    return payload
            try:
                chunk = self._sock.recv(_READ_CHUNK)
            except (ConnectionResetError, BrokenPipeError) as e:
                raise ConnectionClosed(f"reading from {self.addr}: {e}") from e
            if not chunk:
                raise ConnectionClosed(f"{self.addr} closed the connection")
            self._buf += chunk


_BODY_TABLES = {
    ResponseBody.HelloOk: _HelloOkTable,
    ResponseBody.Appended: _AppendedTable,
    ResponseBody.Records: _RecordsTable,
    ResponseBody.StatsReply: _StatsReplyTable,
    ResponseBody.Pong: False,
    ResponseBody.Error: _ErrorTable,
}
