"""Python client for shardlogd, the shardlog durable log daemon.

    from shardlog import Client, AckLevel

    with Client("127.0.0.1:7070") as c:
        ack = c.append(42, [b"hello", b"world"])            # durable once this returns
        for rec in c.read(ack.shard, ack.first_lsn, stream=42).records:
            print(rec.lsn, rec.payload)

    with ClusterClient(["a:7070", "b:7070", "c:7070"]) as c:   # a cluster: order is placement
        c.append(42, b"hello")                                 # on stream 42's home daemon

The wire types in ``shardlog.wire`` are generated from ``proto/schema/shardlog.fbs`` by
``scripts/gen-proto.sh`` (flatc 25.12.19); do not edit them by hand.
"""

from shardlog.wire.AckLevel import AckLevel
from shardlog.wire.ErrorCode import ErrorCode

from .client import (
    ADDR_DEFAULT,
    PROTOCOL_VERSION,
    Appended,
    Client,
    HelloOk,
    ReadRecord,
    Records,
)
from .cluster import ClusterClient, DaemonUnavailable
from .errors import *  # noqa: F401,F403  (one class per ErrorCode)
from .errors import ConnectionClosed, ProtocolError, ServerError, ShardlogError, error_for
from .placement import daemon_for, home_for, jump_hash, mix64, shard_for

__all__ = [
    "ADDR_DEFAULT",
    "PROTOCOL_VERSION",
    "AckLevel",
    "Appended",
    "Client",
    "ClusterClient",
    "ConnectionClosed",
    "DaemonUnavailable",
    "ErrorCode",
    "HelloOk",
    "ProtocolError",
    "ReadRecord",
    "Records",
    "ServerError",
    "ShardlogError",
    "daemon_for",
    "error_for",
    "home_for",
    "jump_hash",
    "mix64",
    "shard_for",
]
