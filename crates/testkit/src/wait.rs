//! Bounded waiting: nothing in a test or harness waits without a limit.

use std::future::Future;
use std::time::Duration;

/// Polls `f` until it returns `Some`, for at most `limit`; panics naming
/// `what` when the limit passes. The pause between polls grows from 20 ms
/// to 250 ms.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut wait = Duration::from_millis(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(250));
    }
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`, for
/// at most `limit`.
pub async fn wait_port(port: u16, limit: Duration, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("{what} did not listen on port {port} within {limit:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "the third poll", || {
            n += 1;
            let v = (n == 3).then_some(n);
            async move { v }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after")]
    async fn eventually_gives_up_at_its_limit() {
        eventually(Duration::from_millis(50), "nothing", || async {
            None::<()>
        })
        .await;
    }

    #[tokio::test]
    async fn wait_port_fails_on_a_closed_port() {
        let port = crate::free_port();
        assert!(
            wait_port(port, Duration::from_millis(100), "nothing")
                .await
                .is_err()
        );
    }
}
