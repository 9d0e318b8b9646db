//! `proto::placement` against the shared test vectors, which the Python client's tests read too:
//! every implementation of the protocol must place every stream on the same shard.

use proto::shard_for;

const VECTORS: &str = include_str!("placement_vectors.txt");

fn vectors() -> Vec<(u64, u16, u16)> {
    VECTORS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "line {}: expected `stream shard_count shard`: {l:?}", i + 1);
            let bad = |what: &str| format!("line {}: bad {what} in {l:?}", i + 1);
            (
                f[0].parse().unwrap_or_else(|_| panic!("{}", bad("stream"))),
                f[1].parse().unwrap_or_else(|_| panic!("{}", bad("shard_count"))),
                f[2].parse().unwrap_or_else(|_| panic!("{}", bad("shard"))),
            )
        })
        .collect()
}

#[test]
fn shared_placement_vectors_hold() {
    let vectors = vectors();
    assert!(vectors.len() >= 500, "only {} vectors", vectors.len());
    assert!(
        vectors.iter().any(|&(s, _, _)| s == u64::MAX),
        "the edge stream u64::MAX is covered"
    );
    assert!(
        vectors.iter().any(|&(_, n, _)| n == u16::MAX),
        "the edge count 65535 is covered"
    );
    for (stream, shard_count, shard) in vectors {
        assert_eq!(
            shard_for(stream, shard_count),
            shard,
            "shard_for({stream}, {shard_count})"
        );
    }
}
