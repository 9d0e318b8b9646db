"""The Python client against a real shardlogd."""

import threading

import pytest

import shardlog
from shardlog import AckLevel, Client, ErrorCode, ServerError, shard_for
from shardlog import errors as errs


def test_hello_reports_the_shard_count(daemon):
    with Client(daemon.addr) as c:
        assert c.server_hello.version == shardlog.PROTOCOL_VERSION
        assert c.shard_count == 2
        assert isinstance(c.server_hello.shard_addresses, list)


def test_every_ack_level_appends_and_reads_back_exact_bytes(daemon):
    stream = 42
    binary = bytes(range(256))
    with Client(daemon.addr) as c:
        a = c.append(stream, [b"durable", b"", binary], AckLevel.Durable, timestamps=[1, None, 3])
        assert (a.shard, a.first_lsn, a.count) == (shard_for(stream, 2), 1, 3)
        w = c.append(stream, "written", AckLevel.Written)
        assert w.first_lsn == 4
        assert c.append(stream, b"none", AckLevel.None_) is None
        c.sync()
        # A None-acked record is durable eventually; a long-poll waits for it.
        got = []
        for rec in c.tail(a.shard, 1, stream=stream):
            got.append(rec)
            if len(got) == 5:
                break
    assert [r.payload for r in got] == [b"durable", b"", binary, b"written", b"none"]
    assert [r.lsn for r in got] == [1, 2, 3, 4, 5]
    assert [r.timestamp for r in got[:3]] == [1, None, 3]
    assert all(r.stream == stream for r in got)


def test_pipelined_appends_answer_in_order(daemon):
    with Client(daemon.addr) as c:
        acks = list(c.append_pipelined(((7, [b"%d" % i]) for i in range(300)), window=16))
        assert [a.first_lsn for a in acks] == list(range(1, 301))
        # Two streams on different shards, interleaved: each keeps its own lsn order.
        s0 = next(s for s in range(100) if shard_for(s, 2) == 0)
        s1 = next(s for s in range(100) if shard_for(s, 2) == 1)
        acks = list(c.append_pipelined(((s0 if i % 2 else s1, b"x") for i in range(100)), AckLevel.Written))
        assert {a.shard for a in acks} == {0, 1}
        for shard in (0, 1):
            lsns = [a.first_lsn for a in acks if a.shard == shard]
            assert lsns == sorted(lsns)
        assert list(c.append_pipelined(((7, b"n") for _ in range(50)), AckLevel.None_)) == [None] * 50
        batch = c.read(shard_for(7, 2), 1, stream=7)
        assert [r.payload for r in batch.records[:3]] == [b"0", b"1", b"2"]


def test_tail_sees_a_record_appended_by_another_client(daemon):
    stream = 5
    with Client(daemon.addr) as reader, Client(daemon.addr) as writer:
        shard = reader.shard_for(stream)
        start = reader.read(shard).next_lsn

        def append_later():
            writer.append(stream, b"from another client")

        t = threading.Thread(target=append_later)
        t.start()
        rec = next(reader.tail(shard, start, stream=stream, max_wait_ms=500))
        t.join()
        assert rec.payload == b"from another client"


def test_daemon_errors_raise_their_own_class(daemon):
    with Client(daemon.addr) as c:
        with pytest.raises(errs.NoSuchShard) as e:
            c.read(99)
        assert e.value.code == ErrorCode.NoSuchShard
        assert isinstance(e.value, ServerError)
        assert "NoSuchShard (4)" in str(e.value)
        # The connection stays usable after an answered error.
        assert c.ping() > 0


def test_frame_above_the_daemon_limit_is_frame_too_large(daemon_factory):
    d = daemon_factory(1, "--max-frame-bytes", "4096")
    with Client(d.addr) as c:
        with pytest.raises(errs.FrameTooLarge):
            c.append(1, b"x" * 8192)


def test_one_exception_class_per_error_code():
    codes = {name: value for name, value in vars(ErrorCode).items() if not name.startswith("_")}
    assert len(codes) >= 14
    for name, value in codes.items():
        cls = getattr(errs, name)
        assert issubclass(cls, ServerError) and cls.CODE == value
        assert type(errs.error_for(value, "m")) is cls
    assert type(errs.error_for(60000, "from a newer daemon")) is ServerError


def test_stats_and_ping(daemon):
    with Client(daemon.addr) as c:
        c.append(3, [b"a", b"b"])
        stats = c.stats()
        assert len(stats.shards) == 2
        assert sum(s.records for s in stats.shards) == 2
        assert stats.front.connections >= 1
        assert c.ping() > 0
