//! The one place that builds real clients (Redis pool, RabbitMQ settings,
//! Databricks HTTP client) from [`Settings`] and wires the parts together.
//! Tests build the same parts through these functions with their own settings.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::{Actions, AuditSettings, Auditor, FindingSink};
use crate::broker::{Broker, BrokerSettings, Publisher};
use crate::config::{ConfigError, Settings, read_pem};
use crate::databricks::{self, ClientSettings, RateBudget, WorkspaceSettings};
use crate::domain::{CallbackSigner, TriggerRules};
use crate::partitions::{Ownership, OwnershipSettings, Progress};
use crate::reconciler::{Reconciler, ReconcilerSettings};
use crate::relay::{self, RelaySettings};
use crate::shutdown::{pause, reconnect_backoff};
use crate::sidecar::{self, AppState, SidecarSettings};
use crate::store::redis_store::{SentinelSettings, StoreSettings, Topology};
use crate::store::{RedisStore, StoreError};
use crate::worker::runner::{self, RunnerSettings};
use crate::worker::{ParamNames, WorkerContext};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("databricks client: {0}")]
    Databricks(#[from] databricks::DatabricksError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("sidecar: {0}")]
    Serve(std::io::Error),
}

/// A name for this process in broker connections and relay consumers.
pub fn instance_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("runbridge-{role}-{host}-{}", std::process::id())
}

/// A worker's name: relay consumer and partition lease holder. Several
/// workers in one process (tests) each get their own.
fn worker_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    match SEQ.fetch_add(1, Ordering::Relaxed) {
        0 => instance_name("worker"),
        n => format!("{}-{n}", instance_name("worker")),
    }
}

fn urls(v: &[secrecy::SecretString]) -> Vec<String> {
    v.iter().map(|u| u.expose_secret().to_owned()).collect()
}

pub async fn store(s: &Settings) -> Result<RedisStore, StartupError> {
    Ok(RedisStore::connect(&StoreSettings {
        url: s.redis.url.expose_secret().to_owned(),
        keys: s.keys()?,
        retention: s.retention(),
        pool_size: s.redis.pool_size,
        response_timeout: Duration::from_millis(s.redis.response_timeout_ms),
        first_poll: Duration::from_millis(s.reconciler.first_poll_ms),
        tls_ca_pem: read_pem("redis.tls_ca_file", &s.redis.tls_ca_file)?,
        topology: match s.redis.mode {
            crate::config::RedisMode::Sentinel => Topology::Sentinel(SentinelSettings {
                sentinels: urls(&s.redis.sentinels),
                master: s.redis.sentinel_master.clone(),
            }),
            crate::config::RedisMode::Cluster => Topology::Cluster {
                seeds: urls(&s.redis.cluster_nodes),
            },
            crate::config::RedisMode::Standalone => Topology::Standalone,
        },
        wait_replicas: s.redis.wait_replicas,
        wait_timeout: Duration::from_millis(s.redis.wait_timeout_ms),
    })
    .await?)
}

pub fn broker_settings(s: &Settings, role: &str) -> BrokerSettings {
    BrokerSettings {
        url: s.amqp.url.clone(),
        fallback_urls: s.amqp.urls.clone(),
        last_node: Default::default(),
        triggers_queue: s.amqp.triggers_queue.clone(),
        dead_letter_exchange: s.amqp.dead_letter_exchange.clone(),
        dead_letter_queue: s.amqp.dead_letter_queue.clone(),
        events_exchange: s.amqp.events_exchange.clone(),
        control_queue: s.amqp.control_queue.clone(),
        delivery_limit: s.amqp.delivery_limit,
        prefetch: s.amqp.prefetch,
        dead_letter_queue_type: s.amqp.dead_letter_queue_type(),
        connection_name: instance_name(role),
        tls_ca_file: s.amqp.tls_ca_file.clone(),
    }
}

pub fn signer(s: &Settings) -> Result<CallbackSigner, ConfigError> {
    CallbackSigner::new(s.auth.callback_secrets.clone())
        .map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// The Databricks client. `budget`: the request budget shared by all workers
/// (the Redis store); `None` limits this process alone.
pub fn jobs_client(
    s: &Settings,
    budget: Option<Arc<dyn RateBudget>>,
) -> Result<databricks::Client, StartupError> {
    let mut workspaces = HashMap::new();
    for (name, w) in &s.databricks.workspaces {
        let mut host = url::Url::parse(&w.host)
            .map_err(|e| ConfigError::Invalid(format!("databricks.workspaces.{name}.host: {e}")))?;
        if !host.path().ends_with('/') {
            host.set_path(&format!("{}/", host.path()));
        }
        workspaces.insert(
            name.clone(),
            WorkspaceSettings {
                host,
                credentials: w.auth().ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "databricks.workspaces.{name} has no credentials (token, or client_id and client_secret)"
                    ))
                })?,
            },
        );
    }
    let d = &s.databricks;
    Ok(databricks::Client::new(
        &ClientSettings {
            workspaces,
            request_timeout: Duration::from_millis(d.request_timeout_ms),
            retry_min_delay: Duration::from_millis(d.retry_min_delay_ms),
            retry_max_delay: Duration::from_millis(d.retry_max_delay_ms),
            retry_max_times: d.retry_max_times,
            launch_per_second: d.launch_per_second,
            poll_per_second: d.poll_per_second,
            cancel_per_second: d.cancel_per_second,
            burst: d.burst,
        },
        budget,
    )?)
}

/// The worker: trigger consumer and outbox relay, until `shutdown`.
pub async fn run_worker(s: &Settings, shutdown: CancellationToken) -> Result<(), StartupError> {
    s.validate(crate::config::Role::Worker)?;
    crate::telemetry::metrics::handle();
    if !s.worker.metrics_listen.is_empty() {
        let l = TcpListener::bind(&s.worker.metrics_listen)
            .await
            .map_err(|e| StartupError::Listen {
                addr: s.worker.metrics_listen.clone(),
                source: e,
            })?;
        let sd = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = sidecar::serve_metrics(l, sd).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    let store = store(s).await?;
    // Promises stored by an older version become searchable (once per
    // deployment), in the background: the walk of the keyspace takes a
    // while on a large one, and nothing else waits for it.
    let indexing = store.clone();
    tokio::spawn(async move {
        match indexing.index_existing().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                promises = n,
                "indexed promises stored before search indexes"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "indexing promises stored before search indexes failed; the next worker start tries again")
            }
        }
    });
    let store_for_gauges = store.clone();
    let ctx = Arc::new(WorkerContext {
        store: store.clone(),
        jobs: jobs_client(s, Some(Arc::new(store.clone())))?,
        signer: signer(s)?,
        rules: TriggerRules {
            default_timeout: Duration::from_secs(s.worker.default_timeout_seconds),
            max_timeout: Duration::from_secs(s.worker.max_timeout_seconds),
            max_children: s.worker.max_children,
            reply_to_prefix: s.amqp.reply_to_prefix.clone(),
        },
        public_url: s.public_url()?,
        params: ParamNames {
            promise_id: s.databricks.param_promise_id.clone(),
            url: s.databricks.param_url.clone(),
            callback_token: s.databricks.param_callback_token.clone(),
        },
        default_workspace: s.databricks.default_workspace.clone(),
        job_styles: Default::default(),
        workspaces: s.databricks.workspaces.keys().cloned().collect(),
        fanout_lease: Duration::from_millis(s.reconciler.lease_ms),
        // Checked by `validate`.
        retry_defaults: s.retry.policies().unwrap_or_default(),
    });
    let name = worker_name();
    // This worker's share of the partitions, for its reconciler and relay,
    // held while its relay goes round.
    let relay_progress = Progress::default();
    let (ownership, assignment) = Ownership::new(
        store.clone(),
        OwnershipSettings {
            member: name.clone(),
            partitions: store.keys().partitions(),
            lease: Duration::from_millis(s.worker.partition_lease_ms),
        },
    );
    let ownership = ownership.with_progress(relay_progress.clone());
    let reconciler = s.reconciler.enabled.then(|| {
        Arc::new(
            Reconciler::new(store.clone(), ctx.jobs.clone(), reconciler_settings(s))
                .with_assignment(assignment.clone()),
        )
    });
    let auditor = s.audit.enabled.then(|| {
        let sink: Arc<dyn FindingSink> = Arc::new(EventsSink::new(broker_settings(s, "audit")));
        Arc::new(Auditor::new(store.clone(), ctx.jobs.clone(), audit_settings(s)).with_sink(sink))
    });
    let fanouts = crate::worker::fanout::run(
        ctx.clone(),
        assignment.clone(),
        Duration::from_millis(s.reconciler.tick_ms),
        s.reconciler.batch,
        shutdown.clone(),
    );
    let retries = crate::worker::retry::run(
        ctx.clone(),
        assignment.clone(),
        Duration::from_millis(s.reconciler.tick_ms),
        s.reconciler.batch,
        shutdown.clone(),
    );
    let consumer = runner::run(
        ctx,
        broker_settings(s, "worker"),
        RunnerSettings {
            requeue_delay: Duration::from_millis(s.worker.requeue_delay_ms),
            retries_in_place: s.worker.retries_in_place,
            drain_timeout: Duration::from_secs(s.worker.drain_timeout_seconds),
            consumer_tag: name.clone(),
        },
        shutdown.clone(),
    );
    let audit = {
        let (workspaces, member, sd) = (
            s.databricks.workspaces.keys().cloned().collect::<Vec<_>>(),
            name.clone(),
            shutdown.clone(),
        );
        // Boxed, as the audit's future is large and the worker's join of
        // its loops is polled on one stack.
        Box::pin(async move {
            if let Some(a) = auditor {
                a.run(workspaces, member, sd).await;
            }
        })
    };
    let relay = relay::run(
        store,
        broker_settings(s, "relay"),
        RelaySettings {
            group: "relay".into(),
            consumer: name,
            batch: s.relay.batch,
            block: Duration::from_millis(s.relay.block_ms),
            reclaim_idle: Duration::from_millis(s.relay.reclaim_idle_ms),
            reclaim_interval: Duration::from_millis(s.relay.reclaim_interval_ms),
        },
        assignment,
        relay_progress,
        shutdown.clone(),
    );
    // Leases are given back only after the relay and reconciler stopped.
    let leases_done = CancellationToken::new();
    let leases = ownership.run(leases_done.clone());
    let gauges = sample_gauges(store_for_gauges, shutdown.clone());
    let shutdown_r = shutdown;
    let reconcile = async {
        if let Some(r) = reconciler {
            r.run(shutdown_r).await;
        }
    };
    let work = async {
        tokio::join!(consumer, relay, reconcile, gauges, fanouts, retries, audit);
        leases_done.cancel();
    };
    tokio::join!(work, leases);
    Ok(())
}

/// The store's sizes as gauges, every few seconds until `shutdown`.
async fn sample_gauges(store: RedisStore, shutdown: CancellationToken) {
    loop {
        match store.partition_stats().await {
            Ok(stats) => {
                let (mut outbox, mut oldest, mut overdue, mut pending_age) =
                    (0u64, 0f64, 0f64, 0f64);
                for p in &stats {
                    let partition = p.partition.to_string();
                    metrics::gauge!("runbridge_promises_pending", "partition" => partition)
                        .set(p.pending as f64);
                    outbox += p.outbox;
                    if let Some(o) = p.overdue {
                        overdue = overdue.max(o.as_secs_f64());
                    }
                    if let Some(a) = p.oldest_pending_age {
                        pending_age = pending_age.max(a.as_secs_f64());
                    }
                    if let Some(a) = p.outbox_oldest_age {
                        oldest = oldest.max(a.as_secs_f64());
                    }
                }
                metrics::gauge!("runbridge_outbox_entries").set(outbox as f64);
                metrics::gauge!("runbridge_promises_overdue_seconds").set(overdue);
                metrics::gauge!("runbridge_promises_oldest_pending_age_seconds").set(pending_age);
                metrics::gauge!("runbridge_outbox_oldest_age_seconds").set(oldest);
            }
            Err(e) => tracing::debug!(error = %e, "metrics: store sizes unavailable"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

pub fn reconciler_settings(s: &Settings) -> ReconcilerSettings {
    let r = &s.reconciler;
    ReconcilerSettings {
        tick: Duration::from_millis(r.tick_ms),
        batch: r.batch,
        lease: Duration::from_millis(r.lease_ms),
        first_poll: Duration::from_millis(r.first_poll_ms),
        max_poll: Duration::from_millis(r.max_poll_ms),
        grace: Duration::from_millis(r.grace_ms),
        success_without_output: r.success_without_output,
        success_with_failures: r.success_with_failures,
        output_task_key: Some(r.output_task_key.clone()).filter(|k| !k.is_empty()),
        cancel_retry_max: Duration::from_millis(r.cancel_retry_max_ms),
        concurrency: r.concurrency,
    }
}

pub fn audit_settings(s: &Settings) -> AuditSettings {
    let a = &s.audit;
    AuditSettings {
        interval: Duration::from_millis(a.interval_ms),
        lookback: Duration::from_millis(a.lookback_ms),
        overlap: Duration::from_millis(a.overlap_ms),
        grace: Duration::from_millis(a.grace_ms),
        lost_after: Duration::from_millis(a.lost_after_ms),
        max_pages: a.max_pages,
        max_checks: a.max_checks,
        keep: Duration::from_millis(a.keep_ms),
        max_findings: a.max_findings,
        actions: Actions {
            orphan: a.actions.orphan,
            duplicate: a.actions.duplicate,
            mismatch: a.actions.mismatch,
            lost: a.actions.lost,
        },
        promise_param: s.databricks.param_promise_id.clone(),
        token_param: s.databricks.param_callback_token.clone(),
    }
}

/// The audit's finding events, on a connection of their own made when the
/// first finding is published and made again after it broke.
struct EventsSink {
    settings: BrokerSettings,
    open: tokio::sync::Mutex<Option<(Broker, Publisher)>>,
}

impl EventsSink {
    fn new(settings: BrokerSettings) -> Self {
        Self {
            settings,
            open: tokio::sync::Mutex::new(None),
        }
    }
}

impl FindingSink for EventsSink {
    fn publish<'a>(
        &'a self,
        routing_key: &'a str,
        id: &'a str,
        body: &'a [u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let mut open = self.open.lock().await;
            if open
                .as_ref()
                .is_none_or(|(b, p)| !b.is_connected() || !p.is_connected())
            {
                if let Some((b, _)) = open.take() {
                    b.close().await;
                }
                let b = Broker::connect(&self.settings)
                    .await
                    .map_err(|e| e.to_string())?;
                let p = b.publisher().await.map_err(|e| e.to_string())?;
                *open = Some((b, p));
            }
            let Some((_, p)) = open.as_ref() else {
                return Err("no broker connection".into());
            };
            p.publish_other_event(routing_key, id, crate::audit::finding::EVENT_TYPE, body)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Keeps a broker connection open to answer /readyz truthfully: ready once
/// the broker is reachable and a worker has declared the topology (in
/// `runbridge all` the sidecar answers before the worker half has).
async fn watch_broker(
    settings: BrokerSettings,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut backoff = reconnect_backoff();
    while !shutdown.is_cancelled() {
        match Broker::connect(&settings).await {
            Ok(b) => {
                backoff = reconnect_backoff();
                while b.is_connected()
                    && !b.events_exchange_declared().await
                    && pause(Duration::from_millis(200), &shutdown).await
                {}
                ready.store(
                    b.is_connected() && !shutdown.is_cancelled(),
                    Ordering::Relaxed,
                );
                while b.is_connected() && pause(Duration::from_secs(1), &shutdown).await {}
                ready.store(false, Ordering::Relaxed);
                b.close().await;
            }
            Err(e) => {
                ready.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "sidecar: broker not reachable (readyz reports it)");
                pause(backoff.next().unwrap_or(Duration::from_secs(10)), &shutdown).await;
            }
        }
    }
}

/// The sidecar, on `listener` (or `sidecar.listen`), until `shutdown`.
pub async fn run_sidecar(
    s: &Settings,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    s.validate(crate::config::Role::Sidecar)?;
    crate::telemetry::metrics::handle();
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(&s.sidecar.listen)
            .await
            .map_err(|e| StartupError::Listen {
                addr: s.sidecar.listen.clone(),
                source: e,
            })?,
    };
    let operator = match s.sidecar.operator_listen.as_str() {
        "" => None,
        addr => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| StartupError::Listen {
                    addr: addr.to_owned(),
                    source: e,
                })?,
        ),
    };
    let store = store(s).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_broker(
        broker_settings(s, "sidecar"),
        ready.clone(),
        shutdown.clone(),
    ));
    // Adoption reads the run: with the workspaces' credentials when the
    // sidecar has them.
    let runs: Option<Arc<dyn databricks::RunReader>> = match jobs_client(
        s,
        Some(Arc::new(store.clone())),
    ) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::info!(reason = %e, "no Databricks client in the sidecar: adopting a run is refused here (runbridge promise adopt works)");
            None
        }
    };
    let state = Arc::new(AppState {
        runs,
        first_poll: Duration::from_millis(s.reconciler.first_poll_ms),
        store,
        signer: signer(s)?,
        operator_tokens: s.auth.operator_tokens.clone(),
        settings: SidecarSettings {
            body_limit: s.sidecar.body_limit_bytes,
            body_timeout: Duration::from_millis(s.sidecar.body_timeout_ms.max(1)),
            max_wait: Duration::from_secs(s.sidecar.max_wait_seconds),
            default_timeout: Duration::from_secs(s.worker.default_timeout_seconds),
            max_timeout: Duration::from_secs(s.worker.max_timeout_seconds),
            default_workspace: s.databricks.default_workspace.clone(),
            workspaces: s.databricks.workspaces.keys().cloned().collect(),
            secure_cookies: !s.sidecar.tls_cert_file.is_empty()
                || s.sidecar.public_url.starts_with("https://"),
            session_idle: Duration::from_secs(s.sidecar.session_idle_seconds),
            session_max: Duration::from_secs(s.sidecar.session_max_seconds),
            progress_interval: Duration::from_millis(s.sidecar.progress_interval_ms),
            progress_history: s.sidecar.progress_history,
        },
        broker_ready: ready,
        notification_auth: s
            .auth
            .notification_password
            .clone()
            .filter(|p| !p.expose_secret().is_empty())
            .map(|p| (s.auth.notification_username.clone(), p)),
        login_throttle: sidecar::ui::throttle::LoginThrottle::new(
            s.sidecar.login_failures_per_client,
            s.sidecar.login_failures_overall,
        ),
        dead_letters: Some(crate::broker::DeadLetterQueue::new(broker_settings(
            s,
            "sidecar-console",
        ))),
    });
    let tls = match (
        read_pem("sidecar.tls_cert_file", &s.sidecar.tls_cert_file)?,
        read_pem("sidecar.tls_key_file", &s.sidecar.tls_key_file)?,
    ) {
        (Some(cert), Some(key)) => Some(sidecar::TlsPem { cert, key }),
        _ => None,
    };
    let limits = sidecar::Limits {
        max_connections: s.sidecar.max_connections,
        max_connections_per_client: s.sidecar.max_connections_per_client,
        header_timeout: Duration::from_millis(s.sidecar.header_timeout_ms),
        allow_h2c: s.sidecar.allow_h2c,
        drain: Duration::from_secs(s.worker.drain_timeout_seconds),
    };
    let kept = state.clone();
    let r = sidecar::serve(listener, operator, state, tls, limits, shutdown)
        .await
        .map_err(StartupError::Serve);
    if let Some(d) = &kept.dead_letters {
        d.close().await;
    }
    let _ = watcher.await;
    r
}
