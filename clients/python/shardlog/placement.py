"""Where a stream lives: identical to the Rust ``proto::placement`` (part of the protocol).

``shard_for(stream, shard_count)`` is the jump consistent hash (Lamping and Veach) of
SplitMix64's finaliser applied to the stream id. Both steps use wrapping 64-bit arithmetic, and
the jump step the same IEEE double arithmetic as the Rust code, so the two agree bit for bit;
``proto/tests/placement_vectors.txt`` pins that for both test suites.

In a cluster (an ordered list of daemons), ``home_for(stream, shard_counts)`` first picks the
daemon with ``daemon_for`` (the same jump hash over the stream id mixed twice), then the shard
of that daemon with ``shard_for``.
"""

from typing import Sequence, Tuple

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: maps a 64-bit ``key`` to a bucket in ``range(buckets)``."""
    if buckets <= 0:
        raise ValueError("buckets must be positive")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        # float() of these integers is exact (both are below 2**53), as in the Rust `as f64`.
        j = int(float(b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_for(stream: int, shard_count: int) -> int:
    """The shard that owns ``stream`` (a u64) in a daemon with ``shard_count`` shards."""
    if not 0 <= stream <= _MASK64:
        raise ValueError(f"stream {stream} is not a u64")
    if not 0 < shard_count <= 0xFFFF:
        raise ValueError(f"shard_count {shard_count} is not in 1..=65535")
    return jump_hash(mix64(stream), shard_count)


def daemon_for(stream: int, daemon_count: int) -> int:
    """The daemon (index into the cluster's ordered address list) that is home to ``stream``.

    Jump consistent hash of the stream id mixed *twice*: the second mix decorrelates the daemon
    from the shard, which ``shard_for`` picks with one mix. Appending a daemon to the list moves
    about ``1 / (n + 1)`` of the streams, all to the new daemon (docs/SCALING.md).
    """
    if not 0 <= stream <= _MASK64:
        raise ValueError(f"stream {stream} is not a u64")
    if not 0 < daemon_count <= 0xFFFFFFFF:
        raise ValueError(f"daemon_count {daemon_count} is not in 1..=4294967295")
    return jump_hash(mix64(mix64(stream)), daemon_count)


def home_for(stream: int, shard_counts: Sequence[int]) -> Tuple[int, int]:
    """A stream's home in a cluster: ``(daemon, shard)``, where ``shard_counts[d]`` is daemon
    ``d``'s shard count (from its ``HelloOk``)."""
    if not shard_counts:
        raise ValueError("a cluster has at least one daemon")
    daemon = daemon_for(stream, len(shard_counts))
    return daemon, shard_for(stream, shard_counts[daemon])
