//! Free local ports.

use std::sync::atomic::{AtomicU16, Ordering};

/// A local port free at the moment (bound, then released), from the
/// kernel's ephemeral range: for a listener that starts once.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free local port: {e}"))
}

/// A free port for a listener that is stopped and started again (Redis,
/// RabbitMQ, sidecars under faults): below the kernel's ephemeral range, so
/// that while the process is down no outgoing connection can take the port
/// as its source port (it would then fail to listen again with "address in
/// use").
pub fn restartable_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_100));
    // Start somewhere different in each process (several harnesses and test
    // binaries may share a machine), then walk up, skipping ports in use.
    if NEXT.load(Ordering::Relaxed) == 0 {
        let start = low + (std::process::id() as u16).wrapping_mul(7919) % (high - low);
        let _ = NEXT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..(high - low) {
        let p = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = if p >= high {
            NEXT.store(low + 1, Ordering::Relaxed);
            low
        } else {
            p
        };
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port between {low} and {high}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restartable_ports_are_distinct_and_below_the_ephemeral_range() {
        let a = restartable_port();
        let b = restartable_port();
        assert_ne!(a, b);
        assert!(a >= 10_000 && b >= 10_000);
        assert!(std::net::TcpListener::bind(("127.0.0.1", a)).is_ok());
    }
}
