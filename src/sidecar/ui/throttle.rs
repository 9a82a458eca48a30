//! Failed console logins, limited per client address and in all.
//!
//! A login form answers as fast as a token can be compared, so without a
//! limit one client guesses hundreds of operator tokens a second. Failures
//! are counted in fixed windows of [`WINDOW`]: once a client address has
//! failed `sidecar.login_failures_per_client` times in a window, or all
//! clients together `sidecar.login_failures_overall` times, every login it
//! (or anyone) sends is refused with 429, without looking at the token,
//! until the window ends. Successful logins, sessions already open and the
//! API's Bearer tokens are not affected.
//!
//! Every failure is counted (`runbridge_console_login_failures_total`,
//! refusals in `runbridge_console_logins_refused_total{scope}`) and a burst
//! is logged once: its first failure in a window, and the moment a limit is
//! reached, never a line per guess.
//!
//! The counts live in this process: each sidecar replica limits on its own.
//! Behind a proxy every login comes from the proxy's address, so the
//! per-client limit is then the proxy's; keep the console on the operator
//! listener, off the internet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a window of counted failures lasts.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Client addresses counted at once: past this, a new address is counted
/// only in the overall limit, so a spray from many addresses costs bounded
/// memory.
const MAX_CLIENTS: usize = 10_000;

/// Why a login was refused before its token was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This address failed too often in this window.
    Client,
    /// All clients together failed too often in this window.
    Overall,
}

pub struct LoginThrottle {
    per_client: u32,
    overall: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    all: u32,
    by_client: HashMap<IpAddr, u32>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            all: 0,
            by_client: HashMap::new(),
        }
    }
}

impl LoginThrottle {
    pub fn new(per_client: u32, overall: u32) -> Self {
        Self {
            per_client: per_client.max(1),
            overall: overall.max(1),
            window: Mutex::new(Window::new(Instant::now())),
        }
    }

    /// The window now (a new one once [`WINDOW`] has passed).
    fn current(&self) -> std::sync::MutexGuard<'_, Window> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(w.started) >= WINDOW {
            *w = Window::new(now);
        }
        w
    }

    /// May a login from `client` be looked at now?
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Refused> {
        let w = self.current();
        let refused = if w.all >= self.overall {
            Some(Refused::Overall)
        } else if client
            .and_then(|c| w.by_client.get(&c))
            .is_some_and(|n| *n >= self.per_client)
        {
            Some(Refused::Client)
        } else {
            None
        };
        match refused {
            None => Ok(()),
            Some(r) => {
                let scope = match r {
                    Refused::Client => "client",
                    Refused::Overall => "overall",
                };
                metrics::counter!("runbridge_console_logins_refused_total", "scope" => scope)
                    .increment(1);
                Err(r)
            }
        }
    }

    /// Counts a failed login from `client` (and logs the burst once).
    pub fn failed(&self, client: Option<IpAddr>) {
        metrics::counter!("runbridge_console_login_failures_total").increment(1);
        let mut w = self.current();
        w.all = w.all.saturating_add(1);
        let all = w.all;
        let from_client = match client {
            Some(c) if w.by_client.len() < MAX_CLIENTS || w.by_client.contains_key(&c) => {
                let n = w.by_client.entry(c).or_insert(0);
                *n = n.saturating_add(1);
                Some(*n)
            }
            _ => None,
        };
        drop(w);
        let who = client.map(|c| c.to_string()).unwrap_or_else(|| "?".into());
        if from_client == Some(1) {
            tracing::warn!(
                client = %who,
                "console login failed; further failures from this address in this minute are counted (runbridge_console_login_failures_total), not logged"
            );
        }
        if from_client == Some(self.per_client) {
            tracing::warn!(
                client = %who,
                failures = self.per_client,
                "console logins from this address failed too often: refused (429) for the rest of the minute"
            );
        }
        if all == self.overall {
            tracing::warn!(
                failures = self.overall,
                "console logins failed too often in all: every login is refused (429) for the rest of the minute"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_is_refused_past_its_failures_until_the_window_ends() {
        let t = LoginThrottle::new(3, 100);
        for _ in 0..3 {
            assert_eq!(t.check(ip("10.0.0.1")), Ok(()));
            t.failed(ip("10.0.0.1"));
        }
        assert_eq!(t.check(ip("10.0.0.1")), Err(Refused::Client));
        assert_eq!(t.check(ip("10.0.0.2")), Ok(()), "another address");
        tokio::time::advance(WINDOW).await;
        assert_eq!(t.check(ip("10.0.0.1")), Ok(()), "a new window");
    }

    #[tokio::test(start_paused = true)]
    async fn every_client_is_refused_past_the_overall_failures() {
        let t = LoginThrottle::new(3, 5);
        for i in 0..5 {
            t.failed(ip(&format!("10.0.1.{i}")));
        }
        assert_eq!(t.check(ip("10.0.2.1")), Err(Refused::Overall));
        assert_eq!(t.check(None), Err(Refused::Overall));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spray_from_many_addresses_keeps_a_bounded_map() {
        let t = LoginThrottle::new(3, u32::MAX);
        for i in 0..(MAX_CLIENTS as u32 + 500) {
            t.failed(Some(IpAddr::from(i.to_be_bytes())));
        }
        assert_eq!(t.current().by_client.len(), MAX_CLIENTS);
    }
}
