"""shardlog.placement against the shared vectors that proto's Rust tests also read."""

from pathlib import Path

from shardlog import shard_for

VECTORS = Path(__file__).resolve().parents[3] / "proto" / "tests" / "placement_vectors.txt"


def vectors():
    for number, line in enumerate(VECTORS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        assert len(fields) == 3, f"line {number}: {line!r}"
        yield tuple(int(f) for f in fields)


def test_shared_placement_vectors_hold():
    vs = list(vectors())
    assert len(vs) >= 500
    for stream, shard_count, shard in vs:
        assert shard_for(stream, shard_count) == shard, f"shard_for({stream}, {shard_count})"


def test_documented_example():
    # docs/PROTOCOL.md: with 4 shards, streams 0..7 live on shards 3, 3, 0, 1, 3, 3, 0, 1.
    assert [shard_for(s, 4) for s in range(8)] == [3, 3, 0, 1, 3, 3, 0, 1]
