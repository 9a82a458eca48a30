//! `TestApp`: the bridge against the machine's real RabbitMQ and Redis and the
//! emulator over real HTTP, with names unique to each test (queues, exchanges,
//! Redis key prefix), so tests run in parallel without seeing each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;
use runbridge::broker::{Broker, EventListener, Publisher, ReceivedEvent};
use runbridge::config::Settings;
use runbridge::domain::{Promise, PromiseId};
use runbridge::emulator::{self, Behaviour, Emulator, EmulatorSettings, Outcome};
use runbridge::startup;
use runbridge::store::{PromiseStore, RedisStore};
pub use runbridge_testkit::{RedisServer, eventually, free_port};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const JOB_CALLBACK: u64 = 1;
pub const JOB_FAIL: u64 = 2;
pub const JOB_EARLY: u64 = 3;
pub const JOB_DUPLICATE: u64 = 4;
pub const JOB_NEVER: u64 = 5;
pub const JOB_SLOW_CALLBACK: u64 = 6;
pub const JOB_EXIT_ONLY: u64 = 7;
pub const JOB_NO_OUTPUT: u64 = 8;
pub const JOB_RETRIED: u64 = 9;
pub const JOB_UNKNOWN: u64 = 999;

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{:012x}",
        rand::rng().random::<u64>() & 0xffff_ffff_ffff
    )
}

pub fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

#[derive(Clone)]
pub struct Options {
    pub worker: bool,
    pub vhost: Option<String>,
    /// More settings (highest priority).
    pub overrides: Vec<(&'static str, String)>,
    /// Workers besides the first (same queue, same Redis), in-process.
    pub extra_workers: usize,
    /// A service principal the emulator accepts for OAuth M2M.
    pub emulator_oauth: Option<emulator::OAuthClient>,
    /// Serve the sidecar over HTTPS with this certificate; the test's client
    /// and the emulator's "notebooks" trust its CA.
    pub sidecar_tls: Option<crate::tls::Pki>,
    /// More broker nodes (`amqp.urls`).
    pub amqp_urls: Vec<String>,
    /// Sentinels to follow (`redis.sentinels`; with `redis.mode` set too).
    pub redis_sentinels: Vec<String>,
    /// Seed nodes of a Redis Cluster of the test's own (`redis.mode =
    /// "cluster"`); empty: the one `RUNBRIDGE_IT_REDIS_CLUSTER` names, if any.
    pub redis_cluster: Vec<String>,
    /// The personal access token the emulator accepts (and the bridge sends).
    pub databricks_token: Option<String>,
    /// Bind no queue to the events exchange: every event is unroutable
    /// until the test binds one (`events` then listens on nothing).
    pub unheard: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            worker: true,
            vhost: None,
            overrides: Vec::new(),
            extra_workers: 0,
            emulator_oauth: None,
            sidecar_tls: None,
            amqp_urls: Vec::new(),
            redis_sentinels: Vec::new(),
            redis_cluster: Vec::new(),
            databricks_token: None,
            unheard: false,
        }
    }
}

pub struct TestApp {
    pub name: String,
    pub settings: Settings,
    /// The overrides, also usable as RUNBRIDGE__* variables for a child process.
    pub overrides: Vec<(&'static str, String)>,
    pub store: RedisStore,
    pub sidecar_url: String,
    pub emulator_url: String,
    pub http: reqwest::Client,
    pub broker: Broker,
    pub publisher: Publisher,
    pub events: EventListener,
    pub shutdown: CancellationToken,
    pub operator_token: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(opts: Options) -> TestApp {
        let name = unique("it");
        let shutdown = CancellationToken::new();

        // The emulator, with one job per behaviour the tests need.
        let mut jobs = BTreeMap::new();
        let job = |outcome, delay_ms, value: &str| Behaviour {
            outcome,
            delay_ms,
            value: value.into(),
            ..Default::default()
        };
        jobs.insert(JOB_CALLBACK, job(Outcome::Callback, 50, "hello world"));
        jobs.insert(JOB_FAIL, job(Outcome::Fail, 50, ""));
        jobs.insert(JOB_EARLY, job(Outcome::EarlyCallback, 50, "early bird"));
        jobs.insert(JOB_DUPLICATE, job(Outcome::DuplicateCallback, 50, "twice"));
        jobs.insert(JOB_NEVER, job(Outcome::NeverFinish, 0, ""));
        jobs.insert(JOB_SLOW_CALLBACK, job(Outcome::Callback, 1500, "slow"));
        jobs.insert(
            JOB_EXIT_ONLY,
            job(Outcome::SuccessNoCallback, 50, "exit value"),
        );
        jobs.insert(JOB_NO_OUTPUT, job(Outcome::SuccessNoOutput, 50, ""));
        jobs.insert(
            JOB_RETRIED,
            job(Outcome::RetryThenCallback, 300, "second attempt"),
        );
        let databricks_token = opts
            .databricks_token
            .clone()
            .unwrap_or_else(|| "dapi-test".into());
        let emu = Emulator::new(EmulatorSettings {
            jobs,
            token: Some(databricks_token.clone()),
            oauth: opts.emulator_oauth.clone(),
            callback_ca_pem: opts
                .sidecar_tls
                .as_ref()
                .map(|p| p.ca_pem.clone().into_bytes()),
            ..Default::default()
        });
        let emu_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind emulator");
        let emulator_url = format!("http://{}", emu_listener.local_addr().expect("addr"));
        let t = tokio::spawn({
            let (emu, sd) = (emu.clone(), shutdown.clone());
            async move {
                let _ = emulator::serve(emu_listener, emu, sd).await;
            }
        });

        let sidecar_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sidecar");
        let scheme = if opts.sidecar_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let sidecar_url = format!(
            "{scheme}://{}",
            sidecar_listener.local_addr().expect("addr")
        );
        let vhost = opts
            .vhost
            .clone()
            .map(|v| format!("/{v}"))
            .unwrap_or_else(|| "/%2f".into());
        let operator_token = "it-operator-token".to_string();
        let overrides: Vec<(&'static str, String)> = vec![
            ("redis.key_prefix", name.clone()),
            (
                "amqp.url",
                format!("amqp://guest:guest@127.0.0.1:5672{vhost}"),
            ),
            ("amqp.triggers_queue", format!("{name}.triggers")),
            ("amqp.dead_letter_exchange", format!("{name}.dlx")),
            ("amqp.dead_letter_queue", format!("{name}.dead")),
            ("amqp.events_exchange", format!("{name}.events")),
            ("amqp.control_queue", format!("{name}.control")),
            ("amqp.prefetch", "32".into()),
            ("worker.requeue_delay_ms", "100".into()),
            ("worker.drain_timeout_seconds", "2".into()),
            ("relay.block_ms", "200".into()),
            ("relay.reclaim_idle_ms", "1000".into()),
            ("relay.reclaim_interval_ms", "300".into()),
            ("sidecar.public_url", sidecar_url.clone()),
            ("databricks.workspaces.default.host", emulator_url.clone()),
            ("databricks.workspaces.default.token", databricks_token),
            ("databricks.retry_min_delay_ms", "20".into()),
            ("databricks.retry_max_delay_ms", "300".into()),
            ("databricks.launch_per_second", "0".into()),
            ("databricks.poll_per_second", "0".into()),
            ("databricks.cancel_per_second", "0".into()),
            ("reconciler.tick_ms", "200".into()),
            ("reconciler.first_poll_ms", "300".into()),
            ("reconciler.grace_ms", "300".into()),
            ("reconciler.lease_ms", "5000".into()),
            ("worker.partition_lease_ms", "2000".into()),
        ];
        let mut overrides = overrides;
        // `make cluster-test` runs tests against a private Redis Cluster,
        // except those that bring a Redis of their own.
        let own_redis = opts
            .overrides
            .iter()
            .any(|(k, _)| matches!(*k, "redis.url" | "redis.mode"));
        let cluster = if opts.redis_cluster.is_empty() {
            redis_cluster_seeds().filter(|_| !own_redis)
        } else {
            Some(opts.redis_cluster.clone())
        };
        if let Some(seeds) = &cluster {
            overrides.push(("redis.mode", "cluster".into()));
            overrides.push(("redis.url", seeds[0].clone()));
        }
        if let Some(pki) = &opts.sidecar_tls {
            overrides.push(("sidecar.tls_cert_file", pki.cert_file.display().to_string()));
            overrides.push(("sidecar.tls_key_file", pki.key_file.display().to_string()));
        }
        // "{emulator}" in an override value stands for the emulator's URL.
        overrides.extend(
            opts.overrides
                .iter()
                .map(|(k, v)| (*k, v.replace("{emulator}", &emulator_url))),
        );
        let mut settings =
            Settings::load_from(&config_dir(), "local", &overrides).expect("settings");
        settings.auth.operator_tokens = vec![operator_token.clone().into()];
        settings.amqp.urls = opts.amqp_urls.iter().map(|u| u.clone().into()).collect();
        if let Some(seeds) = cluster {
            settings.redis.cluster_nodes = seeds.into_iter().map(Into::into).collect();
        }
        settings.redis.sentinels = opts
            .redis_sentinels
            .iter()
            .map(|u| u.clone().into())
            .collect();

        let store = startup::store(&settings).await.expect("redis reachable");
        let bs = startup::broker_settings(&settings, "test");
        let broker = Broker::connect(&bs).await.expect("rabbitmq reachable");
        broker.declare_topology().await.expect("topology");
        let publisher = broker.publisher().await.expect("publisher");
        let heard = (!opts.unheard).then_some(bs.events_exchange.as_str());
        let events = broker.listen(heard, "promise.#").await.expect("listen");

        let mut tasks = vec![t];
        tasks.push(tokio::spawn({
            let (s, sd) = (settings.clone(), shutdown.clone());
            async move {
                if let Err(e) = startup::run_sidecar(&s, Some(sidecar_listener), sd).await {
                    panic!("sidecar failed: {e}");
                }
            }
        }));
        for _ in 0..opts.extra_workers {
            tasks.push(tokio::spawn({
                let (s, sd) = (settings.clone(), shutdown.clone());
                async move {
                    if let Err(e) = startup::run_worker(&s, sd).await {
                        panic!("worker failed: {e}");
                    }
                }
            }));
        }
        if opts.worker {
            tasks.push(tokio::spawn({
                let (s, sd) = (settings.clone(), shutdown.clone());
                async move {
                    if let Err(e) = startup::run_worker(&s, sd).await {
                        panic!("worker failed: {e}");
                    }
                }
            }));
        }
        let http = match &opts.sidecar_tls {
            None => reqwest::Client::new(),
            Some(pki) => reqwest::Client::builder()
                .add_root_certificate(
                    reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA pem"),
                )
                .build()
                .expect("https client"),
        };
        let app = TestApp {
            name,
            settings,
            overrides,
            store,
            sidecar_url,
            emulator_url,
            http,
            broker,
            publisher,
            events,
            shutdown,
            operator_token,
            tasks,
        };
        let url = format!("{}/healthz", app.sidecar_url);
        let http = app.http.clone();
        eventually(Duration::from_secs(10), "sidecar up", || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await;
        app
    }

    /// Where this app's crash points note that they were reached.
    #[cfg(feature = "failpoints")]
    pub fn failpoint_marker(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}.failpoints", self.name))
    }

    /// Waits (up to `limit`) until a child worker noted crash point `point`.
    #[cfg(feature = "failpoints")]
    pub async fn wait_failpoint(&self, point: &str, limit: Duration) {
        let marker = self.failpoint_marker();
        eventually(limit, &format!("a worker to reach {point}"), || async {
            std::fs::read_to_string(&marker)
                .ok()
                .filter(|s| s.contains(point))
        })
        .await;
    }

    /// `run-now` as a person or another tool sends it, straight to the
    /// emulator: no idempotency token, whatever job parameters they chose.
    /// The run's id.
    pub async fn run_by_hand(&self, job_id: u64, job_parameters: Value) -> u64 {
        let body = json!({"job_id": job_id, "job_parameters": job_parameters});
        let r = self.emulator_post("/api/2.2/jobs/run-now", &body).await;
        r["run_id"].as_u64().expect("a run id")
    }

    /// POST to the emulator's Jobs API with the token the app's workspace
    /// uses; the answer as JSON.
    async fn emulator_post(&self, path: &str, body: &Value) -> Value {
        let token = self
            .overrides
            .iter()
            .find(|(k, _)| *k == "databricks.workspaces.default.token")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        self.http
            .post(format!("{}{path}", self.emulator_url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("emulator reachable")
            .json()
            .await
            .expect("emulator json")
    }

    /// A `runbridge worker` child process of this app with `failpoints`
    /// armed (`RUNBRIDGE_FAILPOINTS`), noting them in
    /// [`TestApp::failpoint_marker`]; killed when dropped.
    #[cfg(feature = "failpoints")]
    pub fn spawn_worker(&self, failpoints: &str) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
            .arg("worker")
            .envs(self.env_vars())
            .env("RUNBRIDGE_FAILPOINTS", failpoints)
            .env("RUNBRIDGE_FAILPOINT_MARKER", self.failpoint_marker())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker")
    }

    /// The settings as RUNBRIDGE__* variables, for a child `runbridge` process.
    /// `runbridge all` as a child process with this app's settings, serving
    /// its own sidecar on `port` (so the callbacks of the runs it launches
    /// reach it). Killed when dropped; stdio and more settings are the
    /// caller's.
    pub fn runbridge_all(&self, port: u16) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"));
        c.arg("all")
            .envs(self.env_vars())
            .env("RUNBRIDGE__SIDECAR__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "RUNBRIDGE__SIDECAR__PUBLIC_URL",
                format!("http://127.0.0.1:{port}"),
            )
            .kill_on_drop(true);
        c
    }

    pub fn env_vars(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .overrides
            .iter()
            .map(|(k, val)| {
                (
                    format!("RUNBRIDGE__{}", k.to_uppercase().replace('.', "__")),
                    val.clone(),
                )
            })
            .collect();
        v.push(("RUNBRIDGE_ENV".into(), "local".into()));
        v.push((
            "RUNBRIDGE_CONFIG_DIR".into(),
            config_dir().display().to_string(),
        ));
        v
    }

    pub async fn publish(&self, body: &Value) {
        self.publish_with(body, None, None, None).await;
    }

    pub async fn publish_with(
        &self,
        body: &Value,
        message_id: Option<&str>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) {
        self.publisher
            .publish_trigger(
                &serde_json::to_vec(body).expect("json"),
                message_id,
                reply_to,
                correlation_id,
            )
            .await
            .expect("publish trigger");
    }

    pub async fn publish_raw(&self, bytes: &[u8], message_id: Option<&str>) {
        self.publisher
            .publish_trigger(bytes, message_id, None, None)
            .await
            .expect("publish trigger");
    }

    /// The next event on the test's queue bound to the events exchange.
    pub async fn next_event(&mut self, limit: Duration) -> Option<ReceivedEvent> {
        tokio::time::timeout(limit, self.events.next())
            .await
            .ok()
            .flatten()
    }

    /// Events for `promise_id` received within `limit` (waits the whole time).
    pub async fn events_for(
        &mut self,
        promise_id: &str,
        limit: Duration,
    ) -> Vec<(ReceivedEvent, Value)> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut out = Vec::new();
        while let Some(ev) = self
            .next_event(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            let v: Value = serde_json::from_slice(&ev.body).expect("event json");
            if v["subject"] == json!(promise_id) {
                out.push((ev, v));
            }
        }
        out
    }

    /// Asserts that no (further) event for `promise_id` arrives within `limit`.
    pub async fn assert_no_event(&mut self, promise_id: &str, limit: Duration, why: &str) {
        let more = self.events_for(promise_id, limit).await;
        assert!(
            more.is_empty(),
            "{why}: unexpected events {:?}",
            more.iter().map(|e| &e.1).collect::<Vec<_>>()
        );
    }

    /// Waits for the first event of `promise_id`.
    pub async fn first_event(
        &mut self,
        promise_id: &str,
        limit: Duration,
    ) -> (ReceivedEvent, Value) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self
                .next_event(left)
                .await
                .unwrap_or_else(|| panic!("no event for {promise_id} within {limit:?}"));
            let v: Value = serde_json::from_slice(&ev.body).expect("event json");
            if v["subject"] == json!(promise_id) {
                return (ev, v);
            }
        }
    }

    /// Waits until every id in `ids` has had an event; returns them by id.
    pub async fn events_for_all(
        &mut self,
        ids: &[String],
        limit: Duration,
    ) -> BTreeMap<String, Vec<Value>> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        while ids.iter().any(|id| !got.contains_key(id)) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_event(left).await.unwrap_or_else(|| {
                let missing: Vec<_> = ids.iter().filter(|id| !got.contains_key(*id)).collect();
                panic!("no event within {limit:?} for {missing:?}")
            });
            let v: Value = serde_json::from_slice(&ev.body).expect("event json");
            if let Some(id) = v["subject"].as_str() {
                got.entry(id.to_owned()).or_default().push(v);
            }
        }
        got
    }

    pub async fn promise(&self, id: &str) -> Option<Promise> {
        self.store
            .get(&PromiseId::parse(id).expect("id"))
            .await
            .expect("store get")
    }

    /// GET an emulator endpoint (e.g. `/emulator/runs`) as JSON.
    pub async fn emulator_get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.emulator_url))
            .send()
            .await
            .expect("emulator reachable")
            .json()
            .await
            .expect("emulator json")
    }

    /// All emulator runs whose promise_id parameter is `id`.
    pub async fn runs_for(&self, id: &str) -> Vec<Value> {
        self.emulator_get("/emulator/runs").await["runs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["params"]["promise_id"] == json!(id))
            .collect()
    }

    /// `jobs/create` on the emulator, with the token the app's workspace
    /// uses; the new job's id.
    pub async fn create_job(&self, settings: Value) -> u64 {
        let r = self.emulator_post("/api/2.2/jobs/create", &settings).await;
        r["job_id"].as_u64().expect("a job id")
    }

    /// The Redis key of promise `id` and a connection to the machine's
    /// Redis; `None` on a Redis Cluster (the key lives on whichever node
    /// owns its slot).
    pub async fn promise_key(
        &self,
        id: &str,
    ) -> Option<(String, redis::aio::MultiplexedConnection)> {
        if self.settings.redis.mode == runbridge::config::RedisMode::Cluster {
            return None;
        }
        let key = self
            .settings
            .keys()
            .ok()?
            .promise(&PromiseId::parse(id).ok()?);
        let conn = redis::Client::open("redis://127.0.0.1:6379")
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        Some((key, conn))
    }

    pub async fn emulator_stats(&self) -> Value {
        self.emulator_get("/emulator/stats").await
    }

    pub async fn inject(&self, endpoint: &str, faults: Value) {
        let r = self
            .http
            .post(format!("{}/emulator/inject", self.emulator_url))
            .json(&json!({"endpoint": endpoint, "faults": faults}))
            .send()
            .await
            .expect("inject");
        assert!(r.status().is_success());
    }

    /// Waits for the run of `id` and returns its callback URL (`{url}` parameter).
    pub async fn callback_url(&self, id: &str) -> String {
        eventually(Duration::from_secs(10), "run with callback url", || async {
            self.runs_for(id)
                .await
                .first()
                .and_then(|r| r["params"]["url"].as_str().map(str::to_owned))
        })
        .await
    }

    /// Creates a pending promise `id` through the operator API.
    pub async fn create_promise(&self, id: &str) {
        let r = self
            .operator(self.http.post(format!("{}/promises", self.sidecar_url)))
            .json(&json!({"id": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    }

    /// The capability token `signer` makes for the promise `id` as stored
    /// now (tokens are bound to the promise's creation time).
    pub async fn token_from(
        &self,
        signer: &runbridge::domain::CallbackSigner,
        id: &PromiseId,
    ) -> runbridge::domain::CallbackToken {
        self.promise(id.as_str())
            .await
            .expect("the promise to sign for")
            .callback_token(signer)
    }

    pub fn operator(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.bearer_auth(&self.operator_token)
    }

    pub async fn dead_letters(&self, limit: Duration, n: usize) -> Vec<ReceivedEvent> {
        let mut l = self
            .broker
            .consume_queue(&self.settings.amqp.dead_letter_queue)
            .await
            .expect("consume dlq");
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, l.next()).await {
                Ok(Some(ev)) => out.push(ev),
                _ => break,
            }
        }
        out
    }

    /// Stops everything and removes the test's queues, exchanges and keys.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let _ = self.broker.delete_topology(&[]).await;
        self.broker.close().await;
        delete_keys(&self.settings, &self.name).await;
    }
}

/// The seed nodes of the Redis Cluster to run against instead of the
/// machine's Redis (`RUNBRIDGE_IT_REDIS_CLUSTER`, comma-separated URLs; set
/// by `make cluster-test`).
pub fn redis_cluster_seeds() -> Option<Vec<String>> {
    let v = std::env::var("RUNBRIDGE_IT_REDIS_CLUSTER").ok()?;
    let seeds: Vec<String> = v
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    (!seeds.is_empty()).then_some(seeds)
}

pub async fn delete_keys(settings: &Settings, prefix: &str) {
    use secrecy::ExposeSecret;
    // On a cluster every node is asked for its own keys (a replica refuses
    // the DEL; its primary was asked too). Keys go one by one: a cluster
    // refuses a DEL of keys in different slots.
    let nodes: Vec<String> = match redis_cluster_seeds() {
        Some(seeds) => seeds,
        None => vec![settings.redis.url.expose_secret().to_owned()],
    };
    for node in nodes {
        let Ok(client) = redis::Client::open(node) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        // SCAN, not KEYS: KEYS blocks the shared Redis for the whole
        // keyspace at once, and the tests running beside this one time out;
        // small batches also keep each pipeline under the response timeout
        // (one pipeline of 100,000 DELs did not, and left the keys behind).
        let mut cursor: u64 = 0;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(5000)
                .query_async(&mut conn)
                .await
            else {
                break;
            };
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("UNLINK").arg(k).ignore();
            }
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
}

pub fn trigger(id: &str, job_id: u64) -> Value {
    json!({ "id": id, "job_id": job_id, "tags": {"team": "growth"} })
}

/// Waits until the promise `id` has its run id recorded.
pub async fn wait_run_recorded(app: &TestApp, id: &str) {
    eventually(Duration::from_secs(10), "run id recorded", || async {
        app.promise(id).await.filter(|p| p.run_id.is_some())
    })
    .await;
}

/// Waits until the emulator shows the run of promise `id` cancelled; the run.
pub async fn wait_run_cancelled(app: &TestApp, id: &str) -> Value {
    eventually(
        Duration::from_secs(10),
        "run cancelled in the emulator",
        || async {
            let r = app.runs_for(id).await.into_iter().next().expect("a run");
            (r["result_state"] == "CANCELED" && r["life_cycle_state"] == "TERMINATED").then_some(r)
        },
    )
    .await
}

/// A promise to create with nothing but an id and a timeout (workspace
/// "default").
pub fn new_promise(
    id: &PromiseId,
    timeout: runbridge::store::Timeout,
) -> runbridge::store::NewPromise {
    runbridge::store::NewPromise::bare(id.clone(), timeout, "default")
}

/// The callback secret of `config/local.toml`, as the sidecar checks it.
pub const LOCAL_CALLBACK_SECRET: &str = "local-dev-callback-secret-0123456789abcdef";

/// A signer with one secret (tokens as a worker with it would hand out).
pub fn signer_of(secret: &str) -> runbridge::domain::CallbackSigner {
    runbridge::domain::CallbackSigner::new(vec![secret.to_string().into()]).expect("a long secret")
}

/// `rabbitmqctl` against the shared node, which must succeed.
pub fn rabbitmqctl(args: &[&str]) {
    runbridge_testkit::rabbitmqctl(None, args).unwrap();
}

/// Where `make ui-test-deps` installs the tests' npm packages
/// (`PLAYWRIGHT_MODULES` overrides it).
pub fn node_modules() -> PathBuf {
    std::env::var("PLAYWRIGHT_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/node/node_modules")
        })
}

/// Runs one of the tests' node scripts (a path under the repository) with
/// these environment variables; it must finish within `limit`. Its exit
/// status and its stdout then stderr.
pub async fn run_node(
    script: &str,
    env: &[(&str, &std::ffi::OsStr)],
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    run_script("node".as_ref(), script, env, limit).await
}

/// Runs a script of the tests (a path under the repository) with
/// `program` (node, a venv's python) and these environment variables; it
/// must finish within `limit`. Its exit status and its stdout then stderr.
pub async fn run_script(
    program: &std::path::Path,
    script: &str,
    env: &[(&str, &std::ffi::OsStr)],
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let run = tokio::process::Command::new(program)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script))
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("{} runs: {e}", program.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    (run.status, log)
}
