//! Which executor runs where: front executors, shard executors, and pinning.
//!
//! On C usable CPUs the default is one front executor on the first CPU and one shard executor on
//! each of the other C-1. With a single CPU the front and the one shard share an executor, since
//! two executors pinned to one CPU would only take turns. With no dedicated front
//! (`--front-cores 0`) there is one shard executor per CPU and each also accepts on the main
//! address.
//!
//! Every shard executor also runs a front of its own for its shard-aware port (see `front.rs`);
//! `ExecutorPlan::front` names only the fronts that accept on the main address.

use crate::config::Pin;

/// One glommio executor to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorPlan {
    pub name: String,
    /// `None`: unpinned.
    pub cpu: Option<usize>,
    /// Index of the main-address front this executor runs, if any.
    pub front: Option<usize>,
    /// The shard this executor owns, if any.
    pub shard: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub executors: Vec<ExecutorPlan>,
    pub shard_count: u16,
    pub front_count: usize,
}

impl Plan {
    /// Index in `executors` of the executor that owns `shard`.
    pub fn shard_executor(&self, shard: u16) -> usize {
        self.executors
            .iter()
            .position(|e| e.shard == Some(shard))
            .expect("every shard has an executor")
    }

    /// Index in `executors` of the executor running front `front`.
    pub fn front_executor(&self, front: usize) -> usize {
        self.executors
            .iter()
            .position(|e| e.front == Some(front))
            .expect("every front has an executor")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("invalid --cpus {spec:?}: {reason}")]
    BadCpuList { spec: String, reason: String },
    #[error("--front-cpu {cpu} is not among the usable CPUs {cpus:?}")]
    FrontCpuNotUsable { cpu: usize, cpus: Vec<usize> },
    #[error("--shards must be at least 1")]
    NoShards,
    #[error("--front-cores {fronts} exceeds the {cpus} usable CPUs; lower it, or run with --pin none")]
    TooManyFronts { fronts: usize, cpus: usize },
}

/// Parses "0-3,6,8-9".
pub fn parse_cpu_list(spec: &str) -> Result<Vec<usize>, PlanError> {
    let bad = |reason: &str| PlanError::BadCpuList {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut cpus = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (part, part),
        };
        let lo: usize = lo.parse().map_err(|_| bad("expected a CPU number"))?;
        let hi: usize = hi.parse().map_err(|_| bad("expected a CPU number"))?;
        if lo > hi {
            return Err(bad("a range must go upwards"));
        }
        for cpu in lo..=hi {
            if !cpus.contains(&cpu) {
                cpus.push(cpu);
            }
        }
    }
    if cpus.is_empty() {
        return Err(bad("no CPU listed"));
    }
    Ok(cpus)
}

/// The CPUs this process may run on.
pub fn usable_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let mut cpus = Vec::new();
    if rc == 0 {
        for cpu in 0..libc::CPU_SETSIZE as usize {
            // SAFETY: cpu < CPU_SETSIZE.
            if unsafe { libc::CPU_ISSET(cpu, &set) } {
                cpus.push(cpu);
            }
        }
    }
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        cpus = (0..n).collect();
    }
    cpus
}

/// Lays executors out over `cpus`.
pub fn plan(
    cpus: &[usize],
    front_cpu: Option<usize>,
    front_count: usize,
    shards: Option<u16>,
    pin: Pin,
) -> Result<Plan, PlanError> {
    assert!(!cpus.is_empty());
    if shards == Some(0) {
        return Err(PlanError::NoShards);
    }
    // Order the CPUs so the front CPU comes first.
    let mut ordered: Vec<usize> = cpus.to_vec();
    if let Some(cpu) = front_cpu {
        let Some(at) = ordered.iter().position(|&c| c == cpu) else {
            return Err(PlanError::FrontCpuNotUsable {
                cpu,
                cpus: cpus.to_vec(),
            });
        };
        let cpu = ordered.remove(at);
        ordered.insert(0, cpu);
    }
    if front_count == 0 {
        return Ok(plan_without_front(&ordered, shards, pin));
    }
    if pin == Pin::Fixed && front_count > ordered.len() {
        return Err(PlanError::TooManyFronts {
            fronts: front_count,
            cpus: ordered.len(),
        });
    }
    let front_cpus: Vec<usize> = ordered.iter().copied().take(front_count).collect();
    let shard_cpus: Vec<usize> = ordered.iter().copied().skip(front_count).collect();
    let shard_count = shards.unwrap_or_else(|| shard_cpus.len().clamp(1, u16::MAX as usize) as u16);
    assert!(shard_count > 0);

    let pinned = |cpu: usize| match pin {
        Pin::Fixed => Some(cpu),
        Pin::None => None,
    };
    let mut executors = Vec::new();
    // No CPU left for shards and no more shards than fronts: each shard shares a front's
    // executor rather than fighting it for the same CPU.
    let share = pin == Pin::Fixed && shard_cpus.is_empty() && shard_count as usize <= front_count;
    for (i, &cpu) in front_cpus.iter().enumerate() {
        let shard = (share && i < shard_count as usize).then_some(i as u16);
        let name = match shard {
            Some(s) => format!("front{i}+shard{s:03}"),
            None => format!("front{i}"),
        };
        executors.push(ExecutorPlan {
            name,
            cpu: pinned(cpu),
            front: Some(i),
            shard,
        });
    }
    if !share {
        // More shards than shard CPUs wraps around; `main` warns about it.
        let pool = if shard_cpus.is_empty() {
            &front_cpus
        } else {
            &shard_cpus
        };
        for s in 0..shard_count {
            let cpu = pool[s as usize % pool.len()];
            executors.push(ExecutorPlan {
                name: format!("shard{s:03}"),
                cpu: pinned(cpu),
                front: None,
                shard: Some(s),
            });
        }
    }
    Ok(Plan {
        executors,
        shard_count,
        front_count,
    })
}

/// No dedicated front: one shard executor per CPU (in `ordered`'s order), each accepting on the
/// main address too.
fn plan_without_front(ordered: &[usize], shards: Option<u16>, pin: Pin) -> Plan {
    let shard_count = shards.unwrap_or_else(|| ordered.len().clamp(1, u16::MAX as usize) as u16);
    let executors = (0..shard_count)
        .map(|s| ExecutorPlan {
            name: format!("front{s}+shard{s:03}"),
            cpu: (pin == Pin::Fixed).then(|| ordered[s as usize % ordered.len()]),
            front: Some(s as usize),
            shard: Some(s),
        })
        .collect();
    Plan {
        executors,
        shard_count,
        front_count: shard_count as usize,
    }
}

/// Whether two pinned executors share a CPU.
pub fn oversubscribed(plan: &Plan) -> bool {
    let mut seen = std::collections::HashSet::new();
    plan.executors.iter().filter_map(|e| e.cpu).any(|cpu| !seen.insert(cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cpu_list("4, 1-2,4").unwrap(), vec![4, 1, 2]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn default_layout_is_front_on_first_cpu_and_one_shard_per_other_cpu() {
        let p = plan(&[0, 1, 2, 3], None, 1, None, Pin::Fixed).unwrap();
        assert_eq!(p.shard_count, 3);
        assert_eq!(p.executors.len(), 4);
        assert_eq!(p.executors[0].cpu, Some(0));
        assert_eq!(p.executors[0].front, Some(0));
        assert_eq!(p.executors[0].shard, None);
        for s in 0..3u16 {
            let e = &p.executors[p.shard_executor(s)];
            assert_eq!(e.cpu, Some(s as usize + 1));
            assert_eq!(e.front, None);
        }
        assert!(!oversubscribed(&p));
    }

    #[test]
    fn single_cpu_shares_one_executor() {
        let p = plan(&[5], None, 1, None, Pin::Fixed).unwrap();
        assert_eq!(p.shard_count, 1);
        assert_eq!(p.executors.len(), 1);
        assert_eq!(p.executors[0].front, Some(0));
        assert_eq!(p.executors[0].shard, Some(0));
        assert_eq!(p.executors[0].cpu, Some(5));
    }

    #[test]
    fn unpinned_runs_more_shards_than_cpus() {
        let p = plan(&[0, 1], None, 1, Some(4), Pin::None).unwrap();
        assert_eq!(p.shard_count, 4);
        assert_eq!(p.executors.len(), 5);
        assert!(p.executors.iter().all(|e| e.cpu.is_none()));
    }

    #[test]
    fn front_cpu_override_moves_the_front() {
        let p = plan(&[0, 1, 2], Some(2), 1, None, Pin::Fixed).unwrap();
        assert_eq!(p.executors[p.front_executor(0)].cpu, Some(2));
        let shard_cpus: Vec<_> = (0..p.shard_count)
            .map(|s| p.executors[p.shard_executor(s)].cpu)
            .collect();
        assert_eq!(shard_cpus, vec![Some(0), Some(1)]);
        assert!(plan(&[0, 1], Some(7), 1, None, Pin::Fixed).is_err());
    }

    #[test]
    fn several_fronts_each_get_a_cpu() {
        let p = plan(&[0, 1, 2, 3], None, 2, None, Pin::Fixed).unwrap();
        assert_eq!(p.front_count, 2);
        assert_eq!(p.shard_count, 2);
        assert_eq!(p.executors[p.front_executor(1)].cpu, Some(1));
        assert!(plan(&[0], None, 2, None, Pin::Fixed).is_err());
    }

    #[test]
    fn no_dedicated_front_puts_a_front_on_every_shard_executor() {
        let p = plan(&[0, 1, 2], Some(2), 0, None, Pin::Fixed).unwrap();
        assert_eq!(p.shard_count, 3);
        assert_eq!(p.front_count, 3);
        assert_eq!(p.executors.len(), 3);
        for s in 0..3u16 {
            let e = &p.executors[p.shard_executor(s)];
            assert_eq!(e.front, Some(s as usize));
        }
        assert_eq!(
            p.executors[p.shard_executor(0)].cpu,
            Some(2),
            "--front-cpu still comes first"
        );
        assert!(!oversubscribed(&p));
    }

    #[test]
    fn more_shards_than_cpus_when_pinned_wraps_and_is_reported() {
        let p = plan(&[0, 1], None, 1, Some(3), Pin::Fixed).unwrap();
        assert_eq!(p.shard_count, 3);
        assert!(oversubscribed(&p));
    }
}
