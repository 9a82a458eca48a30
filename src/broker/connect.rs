//! One connection to the broker: to the node that answered last, else the
//! next of `amqp.urls`; every channel it opens is closed before it is.

use super::*;

/// One connection to the broker.
pub struct Broker {
    pub(super) conn: Connection,
    pub(super) settings: BrokerSettings,
    /// Every channel opened on `conn`, so that [`Broker::close`] closes
    /// them (and waits for the broker to confirm) before the connection: a
    /// channel still closing when the connection goes makes lapin log an
    /// error for what is a clean stop.
    pub(super) channels: std::sync::Mutex<Vec<Channel>>,
}

impl Broker {
    /// A new channel on this connection, closed by [`Broker::close`].
    pub(super) async fn channel(&self) -> Result<Channel, lapin::Error> {
        let ch = self.conn.create_channel().await?;
        if let Ok(mut open) = self.channels.lock() {
            open.retain(|c| c.status().connected());
            open.push(ch.clone());
        }
        Ok(ch)
    }

    /// Connects to the node that answered last, else to the next ones in
    /// turn; the error names every node tried (passwords redacted).
    pub async fn connect(settings: &BrokerSettings) -> Result<Self, BrokerError> {
        use std::sync::atomic::Ordering;
        let urls: Vec<&SecretString> = std::iter::once(&settings.url)
            .chain(&settings.fallback_urls)
            .collect();
        let first = settings.last_node.load(Ordering::Relaxed) % urls.len();
        let mut failures = Vec::new();
        for i in (0..urls.len()).map(|k| (first + k) % urls.len()) {
            match Self::connect_to(settings, urls[i]).await {
                Ok(b) => {
                    if i != first {
                        tracing::info!(node = %redact_url(urls[i].expose_secret()), "connected to another broker node");
                    }
                    settings.last_node.store(i, Ordering::Relaxed);
                    return Ok(b);
                }
                Err(e) => failures.push(e),
            }
        }
        Err(match failures.len() {
            1 => failures.remove(0),
            _ => BrokerError::Connect {
                url: format!("{} nodes", failures.len()),
                reason: failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        })
    }

    pub(super) async fn connect_to(
        settings: &BrokerSettings,
        url: &SecretString,
    ) -> Result<Self, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(settings.connection_name.clone().into());
        let failed = |reason: String| BrokerError::Connect {
            url: redact_url(url.expose_secret()),
            reason,
        };
        let tls =
            OwnedTLSConfig {
                identity: None,
                cert_chain: match settings.tls_ca_file.as_str() {
                    "" => None,
                    path => Some(std::fs::read_to_string(path).map_err(|e| {
                        failed(format!("cannot read amqp.tls_ca_file {path:?}: {e}"))
                    })?),
                },
            };
        let runtime = lapin::runtime::default_runtime().map_err(|e| failed(e.to_string()))?;
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect_with_config(url.expose_secret(), props, tls, runtime),
        )
        .await
        .map_err(|_| failed("timed out after 10s".into()))?
        .map_err(|e| failed(e.to_string()))?;
        Ok(Self {
            conn,
            settings: settings.clone(),
            channels: Default::default(),
        })
    }

    /// A channel in confirm mode.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp)?;
        Ok(Publisher {
            channel: ch,
            events_exchange: self.settings.events_exchange.clone(),
            dead_letter_exchange: self.settings.dead_letter_exchange.clone(),
            triggers_queue: self.settings.triggers_queue.clone(),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// Closes every channel it opened, then the connection.
    pub async fn close(&self) {
        let open: Vec<Channel> = self
            .channels
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        for ch in open.iter().filter(|c| c.status().connected()) {
            let _ = ch.close(200, "shutting down".into()).await;
        }
        let _ = self.conn.close(200, "shutting down".into()).await;
    }
}
