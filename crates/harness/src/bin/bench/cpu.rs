//! Where the CPU goes: each process's user + system time from
//! `/proc/<pid>/stat` before and after a measurement, divided by the
//! operations it carried. Seconds of CPU are what the two cores share, so a
//! reader sees which process a scenario's time went to (runbridge, Redis,
//! RabbitMQ, the emulator or responder, the bench itself as load generator).
//!
//! Instructions per operation would not drift with the machine as seconds
//! do, but this machine has no hardware counters (`perf stat -e
//! instructions` answers `<not supported>`), so they are not reported.

use std::collections::BTreeMap;

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` (`sysconf(_SC_CLK_TCK)`, 100
/// on every Linux this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// The processes one measurement watches, by role.
#[derive(Debug, Clone, Default)]
pub(crate) struct Watched(pub(crate) Vec<(String, u32)>);

impl Watched {
    /// The shared services and the bench itself, plus `extra` (runbridge's
    /// processes, the responder).
    pub(crate) fn with_services(extra: &[(&str, Option<u32>)]) -> Self {
        let mut v: Vec<(String, u32)> = extra
            .iter()
            .filter_map(|(n, p)| p.map(|p| (n.to_string(), p)))
            .collect();
        if let Some(p) = redis_pid() {
            v.push(("redis".into(), p));
        }
        if let Some(p) = rabbit_pid() {
            v.push(("rabbitmq".into(), p));
        }
        v.push(("bench (load)".into(), std::process::id()));
        Self(v)
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot(
            self.0
                .iter()
                .map(|(n, p)| (n.clone(), ticks(*p).unwrap_or(0)))
                .collect(),
        )
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Snapshot(Vec<(String, u64)>);

/// CPU microseconds per operation, by process.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PerOp(pub(crate) BTreeMap<String, f64>);

impl PerOp {
    pub(crate) fn total(&self) -> f64 {
        self.0.values().sum()
    }

    /// `redis 12.0, worker 40.1, …` for the notes, largest first.
    pub(crate) fn describe(&self) -> String {
        let mut v: Vec<(&String, &f64)> = self.0.iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        let parts: Vec<String> = v.iter().map(|(n, us)| format!("{n} {us:.0}")).collect();
        format!("{:.0} µs in all: {}", self.total(), parts.join(", "))
    }
}

impl Snapshot {
    /// CPU per operation between `self` and `later`, over `ops` operations.
    pub(crate) fn per_op(&self, later: &Snapshot, ops: usize) -> PerOp {
        let mut out = BTreeMap::new();
        for ((name, a), (_, b)) in self.0.iter().zip(&later.0) {
            let us = b.saturating_sub(*a) as f64 / TICKS_PER_SECOND * 1e6 / ops.max(1) as f64;
            out.insert(name.clone(), us);
        }
        PerOp(out)
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
fn ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields
    // after its closing one (state is field 3, utime 14, stime 15).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn redis_pid() -> Option<u32> {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "info", "server"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

/// The Erlang VM running RabbitMQ (`beam.smp`).
fn rabbit_pid() -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", "beam.smp.*rabbit"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|p| p.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_process_stat_line() {
        assert!(ticks(std::process::id()).is_some());
        assert_eq!(ticks(u32::MAX), None);
    }
}
