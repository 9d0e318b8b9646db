"""ClusterClient against three real daemons on loopback, each with its own data directory."""

import pytest

from shardlog import AckLevel, Client, ClusterClient, DaemonUnavailable, daemon_for, shard_for

#: Shards of daemons 0, 1, 2: different on purpose (a home's shard uses its own daemon's count).
SHARDS = [2, 3, 1]
STREAMS = 30


@pytest.fixture
def cluster(daemon_factory):
    return [daemon_factory(shards) for shards in SHARDS]


def home(stream):
    d = daemon_for(stream, len(SHARDS))
    return d, shard_for(stream, SHARDS[d])


def read_all(addr, shards):
    """Every (stream, shard, payload) of one daemon, read directly from it."""
    out = []
    with Client(addr) as c:
        for shard in range(shards):
            lsn = 1
            while True:
                batch = c.read(shard, lsn)
                if not batch.records:
                    break
                out += [(r.stream, shard, r.payload) for r in batch.records]
                lsn = batch.next_lsn
    return out


def test_records_land_on_their_homes(cluster):
    with ClusterClient([d.addr for d in cluster]) as c:
        for stream in range(STREAMS):
            assert c.home_for(stream) == home(stream)
            ack = c.append(stream, [f"s{stream} r0", f"s{stream} r1"])
            assert ack.shard == home(stream)[1]
        # Pipelined over every daemon at once, answers in the order given.
        acks = c.append_many(((s, f"s{s} r2") for s in range(STREAMS)), window=4)
        assert [a.shard for a in acks] == [home(s)[1] for s in range(STREAMS)]
        assert c.read_stream(7).records[2].payload == b"s7 r2"

    per_daemon = [0] * len(cluster)
    seen = {}
    for d, daemon in enumerate(cluster):
        for stream, shard, payload in read_all(daemon.addr, SHARDS[d]):
            assert home(stream) == (d, shard), f"{payload!r} on daemon {d} shard {shard}"
            per_daemon[d] += 1
            seen.setdefault(stream, []).append(payload)
    assert all(per_daemon), per_daemon
    for stream in range(STREAMS):
        assert seen[stream] == [f"s{stream} r{i}".encode() for i in range(3)]


def test_a_killed_daemon_fails_only_its_streams(cluster):
    victim = 1
    with ClusterClient([d.addr for d in cluster], timeout=60) as c:
        for stream in range(STREAMS):
            c.append(stream, b"before")  # connects every daemon
        cluster[victim].proc.kill()  # SIGKILL
        cluster[victim].proc.wait()
        served = 0
        for attempt in range(2):  # a broken connection first, then a refused reconnection
            for stream in range(STREAMS):
                if daemon_for(stream, len(cluster)) == victim:
                    with pytest.raises(DaemonUnavailable) as info:
                        c.append(stream, b"after", AckLevel.Durable)
                    assert info.value.daemon == victim
                    assert f"daemon {victim} of the cluster ({cluster[victim].addr})" in str(info.value)
                else:
                    c.append(stream, b"after")
                    served += 1
        assert served > 0
        for stream in range(STREAMS):
            if daemon_for(stream, len(cluster)) != victim:
                payloads = [r.payload for r in c.read_stream(stream).records]
                assert payloads == [b"before", b"after", b"after"]


def test_a_bad_list_is_refused():
    with pytest.raises(ValueError):
        ClusterClient([])
    with pytest.raises(ValueError):
        ClusterClient(["a:1", "a:1"])
