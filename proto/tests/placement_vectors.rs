//! `proto::placement` against the shared test vectors, which the Python client's tests read too:
//! every implementation of the protocol must place every stream on the same shard, and in a
//! cluster on the same daemon.

use proto::{daemon_for, home_for, shard_for};

const VECTORS: &str = include_str!("placement_vectors.txt");

/// One line of the vectors file.
#[derive(Debug)]
enum Vector {
    /// `shard_for(stream, shard_count) == shard`.
    Shard { stream: u64, shard_count: u16, shard: u16 },
    /// `daemon_for(stream, daemon_count) == daemon`.
    Daemon {
        stream: u64,
        daemon_count: u32,
        daemon: u32,
    },
    /// `home_for(stream, shard_counts) == (daemon, shard)`.
    Home {
        stream: u64,
        shard_counts: Vec<u16>,
        daemon: u32,
        shard: u16,
    },
}

fn vectors() -> Vec<Vector> {
    VECTORS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let bad = |what: &str| format!("line {}: bad {what} in {l:?}", i + 1);
            fn num<T: std::str::FromStr>(s: &str, bad: &dyn Fn(&str) -> String, what: &str) -> T {
                s.parse().unwrap_or_else(|_| panic!("{}", bad(what)))
            }
            match f[0] {
                "daemon" => {
                    assert_eq!(
                        f.len(),
                        4,
                        "line {}: expected `daemon stream daemon_count daemon`",
                        i + 1
                    );
                    Vector::Daemon {
                        stream: num(f[1], &bad, "stream"),
                        daemon_count: num(f[2], &bad, "daemon_count"),
                        daemon: num(f[3], &bad, "daemon"),
                    }
                }
                "home" => {
                    assert_eq!(
                        f.len(),
                        6,
                        "line {}: expected `home stream daemon_count shard_counts daemon shard`",
                        i + 1
                    );
                    let daemon_count: usize = num(f[2], &bad, "daemon_count");
                    let shard_counts: Vec<u16> = f[3].split(',').map(|c| num(c, &bad, "shard count")).collect();
                    assert_eq!(shard_counts.len(), daemon_count, "{}", bad("number of shard counts"));
                    Vector::Home {
                        stream: num(f[1], &bad, "stream"),
                        shard_counts,
                        daemon: num(f[4], &bad, "daemon"),
                        shard: num(f[5], &bad, "shard"),
                    }
                }
                _ => {
                    assert_eq!(f.len(), 3, "line {}: expected `stream shard_count shard`: {l:?}", i + 1);
                    Vector::Shard {
                        stream: num(f[0], &bad, "stream"),
                        shard_count: num(f[1], &bad, "shard_count"),
                        shard: num(f[2], &bad, "shard"),
                    }
                }
            }
        })
        .collect()
}

#[test]
fn shared_placement_vectors_hold() {
    let vectors: Vec<(u64, u16, u16)> = vectors()
        .into_iter()
        .filter_map(|v| match v {
            Vector::Shard {
                stream,
                shard_count,
                shard,
            } => Some((stream, shard_count, shard)),
            _ => None,
        })
        .collect();
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

#[test]
fn shared_cluster_vectors_hold() {
    let (mut daemons, mut homes) = (0, 0);
    let (mut max_count, mut nonzero_daemon) = (0u32, false);
    for v in vectors() {
        match v {
            Vector::Shard { .. } => {}
            Vector::Daemon {
                stream,
                daemon_count,
                daemon,
            } => {
                daemons += 1;
                max_count = max_count.max(daemon_count);
                assert_eq!(
                    daemon_for(stream, daemon_count),
                    daemon,
                    "daemon_for({stream}, {daemon_count})"
                );
            }
            Vector::Home {
                stream,
                shard_counts,
                daemon,
                shard,
            } => {
                homes += 1;
                nonzero_daemon |= daemon > 0;
                // The home's daemon is daemon_for over the list's length, whatever the counts.
                assert_eq!(daemon_for(stream, shard_counts.len() as u32), daemon);
                assert_eq!(
                    home_for(stream, &shard_counts),
                    (daemon, shard),
                    "home_for({stream}, {shard_counts:?})"
                );
            }
        }
    }
    assert!(
        daemons >= 200 && homes >= 200,
        "{daemons} daemon and {homes} home vectors"
    );
    assert_eq!(max_count, u32::MAX, "the edge daemon count 2^32 - 1 is covered");
    assert!(nonzero_daemon, "some home is not daemon 0");
}

#[test]
fn documented_cluster_example_holds() {
    // docs/PROTOCOL.md: the homes of streams 0..7 with 3 daemons of 2 shards each, and their
    // daemons once a fourth is appended: only streams 0, 3 and 6 move, all to the new daemon.
    let homes: Vec<(u32, u16)> = (0..8).map(|s| home_for(s, &[2, 2, 2])).collect();
    assert_eq!(homes, [(1, 1), (1, 0), (2, 0), (0, 1), (1, 0), (0, 0), (1, 0), (2, 1)]);
    let daemons: Vec<u32> = (0..8).map(|s| daemon_for(s, 4)).collect();
    assert_eq!(daemons, [3, 1, 2, 3, 1, 0, 3, 2]);
}
