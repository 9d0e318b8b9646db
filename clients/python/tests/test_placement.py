"""shardlog.placement against the shared vectors that proto's Rust tests also read."""

from pathlib import Path

import pytest

from shardlog import daemon_for, home_for, shard_for

VECTORS = Path(__file__).resolve().parents[3] / "proto" / "tests" / "placement_vectors.txt"


def lines():
    for number, line in enumerate(VECTORS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        yield number, line.split()


def vectors():
    """The plain lines: ``(stream, shard_count, shard)``."""
    for number, fields in lines():
        if fields[0] in ("daemon", "home"):
            continue
        assert len(fields) == 3, f"line {number}: {fields!r}"
        yield tuple(int(f) for f in fields)


def test_shared_placement_vectors_hold():
    vs = list(vectors())
    assert len(vs) >= 500
    for stream, shard_count, shard in vs:
        assert shard_for(stream, shard_count) == shard, f"shard_for({stream}, {shard_count})"


def test_shared_cluster_vectors_hold():
    daemons = homes = 0
    for number, fields in lines():
        if fields[0] == "daemon":
            assert len(fields) == 4, f"line {number}: {fields!r}"
            stream, daemon_count, daemon = (int(f) for f in fields[1:])
            assert daemon_for(stream, daemon_count) == daemon, f"line {number}: daemon_for({stream}, {daemon_count})"
            daemons += 1
        elif fields[0] == "home":
            assert len(fields) == 6, f"line {number}: {fields!r}"
            stream, daemon_count = int(fields[1]), int(fields[2])
            shard_counts = [int(c) for c in fields[3].split(",")]
            assert len(shard_counts) == daemon_count, f"line {number}"
            want = (int(fields[4]), int(fields[5]))
            assert home_for(stream, shard_counts) == want, f"line {number}: home_for({stream}, {shard_counts})"
            homes += 1
    assert daemons >= 200 and homes >= 200


def test_documented_example():
    # docs/PROTOCOL.md: with 4 shards, streams 0..7 live on shards 3, 3, 0, 1, 3, 3, 0, 1.
    assert [shard_for(s, 4) for s in range(8)] == [3, 3, 0, 1, 3, 3, 0, 1]


def test_documented_cluster_example():
    # docs/PROTOCOL.md: the homes of streams 0..7 with 3 daemons of 2 shards each, and their
    # daemons once a fourth is appended: only streams 0, 3 and 6 move, all to the new daemon.
    assert [home_for(s, [2, 2, 2]) for s in range(8)] == [(1, 1), (1, 0), (2, 0), (0, 1), (1, 0), (0, 0), (1, 0), (2, 1)]
    assert [daemon_for(s, 4) for s in range(8)] == [3, 1, 2, 3, 1, 0, 3, 2]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        daemon_for(1, 0)
    with pytest.raises(ValueError):
        daemon_for(-1, 3)
    with pytest.raises(ValueError):
        home_for(1, [])

