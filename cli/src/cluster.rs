//! The daemons a run talks to: the one `--addr`, or the ordered list of `--cluster` /
//! `--cluster-file` / `SHARDLOG_CLUSTER`. A stream's home is `(daemon_for(stream, n), shard_for
//! on that daemon)` (docs/PROTOCOL.md, "Cluster placement"). A daemon is connected when a
//! request first needs it, so one that is down fails only the commands that need it, and every
//! failure of a daemon in a cluster names it.

use std::time::Duration;

use proto::{daemon_for, shard_for};

use crate::args::Common;
use crate::conn::Conns;
use crate::failure::Failure;

pub struct Cluster {
    addrs: Vec<String>,
    timeout: Duration,
    /// Indexed like `addrs`; `None` until first used.
    conns: Vec<Option<Conns>>,
}

impl Cluster {
    pub fn new(addrs: Vec<String>, timeout: Duration) -> Cluster {
        assert!(!addrs.is_empty(), "a cluster has at least one daemon");
        assert!(u32::try_from(addrs.len()).is_ok(), "fewer than 2^32 daemons");
        let conns = addrs.iter().map(|_| None).collect();
        Cluster { addrs, timeout, conns }
    }

    /// Whether there are several daemons (then output and errors name the daemon).
    pub fn is_cluster(&self) -> bool {
        self.addrs.len() > 1
    }

    pub fn daemon_count(&self) -> u32 {
        self.addrs.len() as u32
    }

    pub fn addr(&self, daemon: u32) -> &str {
        &self.addrs[daemon as usize]
    }

    /// The daemon that is home to `stream` (needs no connection).
    pub fn daemon_for(&self, stream: u64) -> u32 {
        daemon_for(stream, self.daemon_count())
    }

    /// `stream`'s home `(daemon, shard)`; connects to the daemon to learn its shard count.
    pub fn home_for(&mut self, stream: u64) -> Result<(u32, u16), Failure> {
        let daemon = self.daemon_for(stream);
        let shard_count = self.with(daemon, |c| Ok(c.shard_count()))?;
        Ok((daemon, shard_for(stream, shard_count)))
    }

    /// Runs `f` on daemon `daemon`'s connections (opened now if needed). In a cluster, a failure
    /// is wrapped to name the daemon.
    pub fn with<T>(&mut self, daemon: u32, f: impl FnOnce(&mut Conns) -> Result<T, Failure>) -> Result<T, Failure> {
        let result = self.conns(daemon).and_then(f);
        result.map_err(|e| self.named(daemon, e))
    }

    /// Daemons connected so far.
    pub fn open_daemons(&self) -> Vec<u32> {
        (0..self.daemon_count())
            .filter(|&d| self.conns[d as usize].is_some())
            .collect()
    }

    /// `failure` as a failure of daemon `daemon`. Unchanged with a single daemon, and for local
    /// failures (stdin, stdout, usage, input), which are no daemon's doing.
    pub fn named(&self, daemon: u32, failure: Failure) -> Failure {
        let of_daemon = matches!(
            failure,
            Failure::Connect { .. } | Failure::Client(_) | Failure::Protocol(_)
        );
        if !self.is_cluster() || !of_daemon {
            return failure;
        }
        Failure::Daemon {
            daemon,
            addr: self.addrs[daemon as usize].clone(),
            source: Box::new(failure),
        }
    }

    fn conns(&mut self, daemon: u32) -> Result<&mut Conns, Failure> {
        let slot = &mut self.conns[daemon as usize];
        if slot.is_none() {
            *slot = Some(Conns::connect(&self.addrs[daemon as usize], self.timeout)?);
        }
        Ok(slot.as_mut().expect("connected above"))
    }
}

/// The daemon list a run uses: `--cluster` or `--cluster-file` when given, else `--addr`.
pub fn addresses(common: &Common) -> Result<Vec<String>, Failure> {
    let list: Vec<String> = if let Some(list) = &common.cluster {
        list.split(',').map(|a| a.trim().to_string()).collect()
    } else if let Some(path) = &common.cluster_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--cluster-file {}: {e}", path.display())))?;
        parse_cluster_file(&text)
    } else {
        return Ok(vec![common.addr.clone()]);
    };
    if list.is_empty() || list.iter().any(String::is_empty) {
        return Err(Failure::Usage(
            "a cluster is a list of HOST:PORT addresses, with none empty (example: --cluster a:7070,b:7070)".into(),
        ));
    }
    for (i, a) in list.iter().enumerate() {
        if list[..i].contains(a) {
            return Err(Failure::Usage(format!("the cluster lists {a} twice")));
        }
    }
    if u32::try_from(list.len()).is_err() {
        return Err(Failure::Usage("a cluster has fewer than 2^32 daemons".into()));
    }
    Ok(list)
}

/// One address a line; blank lines and `#` comments are skipped. Order matters: it is placement.
fn parse_cluster_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_file_keeps_order_and_skips_comments() {
        let text = "# cluster of three\na:7070\n\n  b:7070  # second\nc:7070\n";
        assert_eq!(parse_cluster_file(text), ["a:7070", "b:7070", "c:7070"]);
    }
}
