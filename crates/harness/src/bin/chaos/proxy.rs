//! TCP proxies between runbridge and Redis, RabbitMQ or the emulator: the
//! `proxy` fault cuts, blackholes or delays one link at a time (netem and
//! toxiproxy are not available here).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

/// What a proxied link does right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    Pass,
    /// Existing connections are reset and new ones refused.
    Cut,
    /// Nothing flows either way (a partition); when it ends, the stalled
    /// connections are reset, as a real partition's would time out.
    Blackhole,
    /// Every chunk waits this long before it is forwarded.
    Delay(u64),
}

/// A TCP proxy the harness puts between runbridge and Redis, RabbitMQ or the
/// emulator (netem and toxiproxy are not available here). It never drops
/// bytes mid-stream (TCP does not): a blackhole stalls, then resets.
pub struct Proxy {
    pub name: &'static str,
    pub port: u16,
    mode: tokio::sync::watch::Sender<(LinkMode, u64)>,
}

impl Proxy {
    pub async fn start(name: &'static str, upstream: u16) -> Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // (mode, generation): a new generation resets every open connection.
        let (tx, rx) = tokio::sync::watch::channel((LinkMode::Pass, 0u64));
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = rx.clone();
                let (mode, generation) = *rx.borrow();
                if mode == LinkMode::Cut {
                    drop(down);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        _ = pump(dr, uw, rx.clone()) => {}
                        _ = pump(ur, dw, rx.clone()) => {}
                        _ = reset_on_new_generation(rx, generation) => {}
                    }
                });
            }
        });
        Ok(Arc::new(Self {
            name,
            port,
            mode: tx,
        }))
    }

    pub fn set(&self, mode: LinkMode) {
        self.mode.send_modify(|(m, g)| {
            // Cutting, or ending a blackhole, resets open connections.
            if mode == LinkMode::Cut || *m == LinkMode::Blackhole {
                *g += 1;
            }
            *m = mode;
        });
    }
}

async fn reset_on_new_generation(
    mut rx: tokio::sync::watch::Receiver<(LinkMode, u64)>,
    generation: u64,
) {
    while rx.changed().await.is_ok() {
        if rx.borrow().1 != generation {
            return;
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: tokio::sync::watch::Receiver<(LinkMode, u64)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let mode = rx.borrow().0;
            match mode {
                LinkMode::Pass => break,
                LinkMode::Delay(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    break;
                }
                // Hold the bytes until the link heals (then the connection is reset).
                LinkMode::Blackhole | LinkMode::Cut => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
