//! The `runbridge` binary: parses the command line and hands over to the
//! library. `anyhow` lives here and nowhere else.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use runbridge::broker::Broker;
use runbridge::config::{Role, Settings};
use runbridge::domain::{IdPattern, Payload, PromiseId, SettledBy, State};
use runbridge::emulator;
use runbridge::reconciler::{CancelFilter, cancel_matching};
use runbridge::startup;
use runbridge::store::{PromiseStore, SearchQuery, Settle, SettleOutcome};
use serde_json::{Value, json};

// jemalloc, not the system allocator: glibc's malloc showed up in the
// worker's profile as lock waits and context switches between the tokio and
// lapin threads. Measured in `make bench` (bench/README.md): about a fifth
// less worker CPU per trigger and per settle, at a peak RSS still within B6.
// mimalloc was as fast but took B6 above its limit (77 MiB).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "runbridge",
    version,
    about = "RabbitMQ triggers → Databricks runs → durable promises → completion events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trigger consumer and outbox relay.
    Worker,
    /// HTTP sidecar: callbacks, promise API, health.
    Sidecar,
    /// Worker and sidecar in one process (local use).
    All,
    /// A Databricks Jobs API 2.2 emulator.
    Emulate(Box<emulator::cli::Args>),
    /// Publish a trigger; with --wait, print its completion event.
    Trigger(TriggerArgs),
    /// Operate on promises.
    #[command(subcommand)]
    Promise(PromiseCmd),
    /// Is this deployment ready? Checks the configuration, RabbitMQ's
    /// topology, Redis's eviction policy and persistence, each workspace's
    /// credentials and each --job-id's definition; a table of what is ready
    /// and what to change; exits 1 when something must change.
    Check(CheckArgs),
    /// Hold the workspace against the promises once: list its runs (every
    /// active one, and those started within --since), read each run's
    /// promise and each pending promise's run, print what disagrees
    /// (orphan, duplicate, mismatch, lost); exits 1 when something is found.
    /// With --fix, does what `[audit.actions]` says for each finding.
    Audit(AuditArgs),
    /// Print a machine-readable contract, generated from the code: JSON
    /// Schemas, the sidecar's OpenAPI document, the AsyncAPI document.
    Schema(SchemaArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// A job runbridge will launch (repeatable).
    #[arg(long = "job-id", value_name = "JOB_ID")]
    job_ids: Vec<u64>,
    /// The workspace of the jobs (default: databricks.default_workspace).
    #[arg(long)]
    workspace: Option<String>,
}

#[derive(Args)]
struct AuditArgs {
    /// How far back to list the runs started (30m, 24h, 7d).
    #[arg(long, default_value = "24h")]
    since: String,
    /// Only this workspace (default: every configured one).
    #[arg(long)]
    workspace: Option<String>,
    /// Apply the configured actions (cancel orphans and duplicates, settle
    /// lost promises) and keep the findings, as the worker's audit does.
    #[arg(long)]
    fix: bool,
    /// Print the findings as JSON, one per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SchemaArgs {
    #[arg(value_enum)]
    document: SchemaDoc,
    /// Describe the compiled-in default queue and exchange names rather than
    /// this deployment's configuration (what docs/ holds).
    #[arg(long)]
    defaults: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchemaDoc {
    /// JSON Schema of the trigger message.
    Trigger,
    /// JSON Schema of the completion event.
    Event,
    /// JSON Schema of a control-queue message.
    Control,
    /// JSON Schema of a progress event.
    ProgressEvent,
    /// JSON Schema of an audit finding event.
    FindingEvent,
    /// OpenAPI 3.1 of the sidecar (as served at /openapi.json).
    Openapi,
    /// AsyncAPI 3.0 (YAML) of the queues and exchanges.
    Asyncapi,
}

fn schema(settings: &Settings, a: SchemaArgs) -> Result<()> {
    use runbridge::schemas;
    let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v);
    let text = match a.document {
        SchemaDoc::Trigger => pretty(schemas::trigger())?,
        SchemaDoc::Event => pretty(schemas::event())?,
        SchemaDoc::Control => pretty(schemas::control())?,
        SchemaDoc::ProgressEvent => pretty(schemas::progress_event())?,
        SchemaDoc::FindingEvent => pretty(schemas::finding_event())?,
        SchemaDoc::Openapi => runbridge::sidecar::openapi::document(),
        SchemaDoc::Asyncapi => {
            let defaults;
            let amqp = if a.defaults {
                defaults = Settings::defaults()?;
                &defaults.amqp
            } else {
                &settings.amqp
            };
            schemas::to_yaml(&schemas::asyncapi(amqp))
        }
    };
    println!("{}", text.trim_end());
    Ok(())
}

#[derive(Args)]
struct TriggerArgs {
    #[arg(long)]
    job_id: u64,
    /// Job parameter k=v (repeatable).
    #[arg(long = "param", value_name = "K=V")]
    params: Vec<String>,
    /// Send parameters as legacy notebook_params instead of job_parameters.
    #[arg(long)]
    notebook_params: bool,
    /// Promise id (default: a fresh one).
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    timeout_seconds: Option<u64>,
    /// Tag k=v (repeatable).
    #[arg(long = "tag", value_name = "K=V")]
    tags: Vec<String>,
    /// Wait for the completion event and print it.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value_t = 300)]
    wait_seconds: u64,
    /// Print the event on one line.
    #[arg(long)]
    compact: bool,
}

#[derive(Subcommand)]
enum PromiseCmd {
    /// Print a promise.
    Get { id: String },
    /// Search promises.
    List {
        #[arg(long, default_value = "*")]
        id: String,
        #[arg(long)]
        state: Option<String>,
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Resolve a pending promise.
    Resolve {
        id: String,
        #[arg(long)]
        value: Option<String>,
    },
    /// Reject a pending promise.
    Reject {
        id: String,
        #[arg(long)]
        error: Option<String>,
    },
    /// Cancel pending promises (REJECTED_CANCELED) and their runs: one id,
    /// or every pending promise matching --tag / --job-id / an id with `*`.
    Cancel {
        id: Option<String>,
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
        #[arg(long)]
        job_id: Option<u64>,
        #[arg(long, default_value = "canceled by an operator")]
        reason: String,
    },
    /// Start the next attempt of a promise waiting to retry, now.
    Retry { id: String },
    /// Make a pending promise follow a run started outside runbridge (a
    /// re-run from the Databricks UI): checked, timed out and settled from
    /// that run as if runbridge had launched it. The run must be one of the
    /// promise's job, in its workspace.
    Adopt {
        id: String,
        /// The Databricks run id.
        #[arg(long = "run", value_name = "RUN_ID")]
        run: u64,
    },
}

fn kv(items: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("{what} {s:?} is not K=V"))
        })
        .collect()
}

async fn emulate(s: &Settings, a: emulator::cli::Args) -> Result<()> {
    let names = emulator::cli::ParamNames {
        url: s.databricks.param_url.clone(),
        promise_id: s.databricks.param_promise_id.clone(),
        callback_token: s.databricks.param_callback_token.clone(),
    };
    let listen = s.emulator.listen.clone();
    emulator::cli::run(a, &listen, names, runbridge::shutdown::on_signals())
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

async fn trigger(s: &Settings, a: TriggerArgs) -> Result<()> {
    let id = match a.id {
        Some(id) => PromiseId::parse(&id)
            .map_err(anyhow::Error::msg)?
            .to_string(),
        None => format!(
            "cli-{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            std::process::id()
        ),
    };
    let params = kv(&a.params, "--param")?;
    let mut body = json!({ "id": id, "job_id": a.job_id });
    if !params.is_empty() {
        body[if a.notebook_params {
            "notebook_params"
        } else {
            "job_parameters"
        }] = json!(params);
    }
    if let Some(t) = a.timeout_seconds {
        body["timeout_seconds"] = json!(t);
    }
    let tags = kv(&a.tags, "--tag")?;
    if !tags.is_empty() {
        body["tags"] = json!(tags);
    }
    let bs = startup::broker_settings(s, "cli");
    let broker = Broker::connect(&bs).await?;
    broker.declare_topology().await?;
    let publisher = broker.publisher().await?;
    // Bound to the events exchange (so the event is routable even where no
    // consumer is bound yet) and used as reply_to (so a duplicate trigger of a
    // settled promise still gets its stored outcome).
    let mut listener = if a.wait {
        Some(
            broker
                .listen(Some(broker.events_exchange()), "promise.#")
                .await?,
        )
    } else {
        None
    };
    let reply_to = listener.as_ref().map(|l| l.queue.clone());
    publisher
        .publish_trigger(
            &serde_json::to_vec(&body)?,
            Some(&id),
            reply_to.as_deref(),
            Some(&id),
        )
        .await
        .context("publishing the trigger")?;
    eprintln!("published trigger {id}");
    if let Some(l) = listener.as_mut() {
        let wait = async {
            loop {
                let ev = l
                    .next()
                    .await
                    .context("broker connection closed while waiting")?;
                let v: Value = serde_json::from_slice(&ev.body)?;
                if v["subject"] == json!(id) {
                    return anyhow::Ok(v);
                }
            }
        };
        let v = tokio::time::timeout(Duration::from_secs(a.wait_seconds), wait)
            .await
            .with_context(|| format!("no completion event within {}s", a.wait_seconds))??;
        if a.compact {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    broker.close().await;
    Ok(())
}

async fn promise(s: &Settings, cmd: PromiseCmd) -> Result<()> {
    let store = startup::store(s).await?;
    let settle = |id: String, target: State, data: Option<String>| {
        let store = store.clone();
        async move {
            let id = PromiseId::parse(&id).map_err(anyhow::Error::msg)?;
            let req = Settle {
                id: id.clone(),
                target,
                value: data.map(Payload::data).unwrap_or_default(),
                ikey: None,
                strict: true,
                settled_by: SettledBy::Operator,
                cancel_run: false,
                capability: None,
            };
            match store.settle(&req).await? {
                SettleOutcome::Settled(p) | SettleOutcome::Deduplicated(p) => Ok(p.to_json()),
                SettleOutcome::TimedOut(p) => {
                    bail!("promise {id} had passed its timeout: it is now {}", p.state)
                }
                SettleOutcome::AlreadySettled(p) => bail!("promise {id} is already {}", p.state),
                // An operator's settle carries no capability.
                SettleOutcome::NotFound | SettleOutcome::NotOpened => bail!("no promise {id}"),
            }
        }
    };
    let out = match cmd {
        PromiseCmd::Get { id } => {
            let id = PromiseId::parse(&id).map_err(anyhow::Error::msg)?;
            let p = store
                .get(&id)
                .await?
                .with_context(|| format!("no promise {id}"))?;
            let mut view = p.view();
            // A parent is printed with its children and their states.
            if let Some(children) = view.children.as_mut() {
                children.items = Some(
                    runbridge::join::children_now(&store, &id)
                        .await?
                        .iter()
                        .map(runbridge::store::ChildEntry::view)
                        .collect(),
                );
            }
            serde_json::to_value(view)?
        }
        PromiseCmd::List {
            id,
            state,
            tags,
            limit,
        } => {
            let states = match state {
                None => None,
                Some(s) if s.eq_ignore_ascii_case("rejected") => Some(vec![
                    State::Rejected,
                    State::RejectedCanceled,
                    State::RejectedTimedout,
                ]),
                Some(s) => Some(vec![s.parse::<State>().map_err(anyhow::Error::msg)?]),
            };
            let page = store
                .search(&SearchQuery {
                    id: IdPattern::parse(&id).map_err(anyhow::Error::msg)?,
                    states,
                    tags: kv(&tags, "--tag")?,
                    job_id: None,
                    limit,
                    cursor: None,
                    workspace: None,
                })
                .await?;
            json!({ "promises": page.promises.iter().map(|p| p.to_json()).collect::<Vec<_>>(), "cursor": page.cursor })
        }
        PromiseCmd::Resolve { id, value } => settle(id, State::Resolved, value).await?,
        PromiseCmd::Reject { id, error } => settle(id, State::Rejected, error).await?,
        PromiseCmd::Cancel {
            id,
            tags,
            job_id,
            reason,
        } => {
            let filter = CancelFilter::new(id.as_deref(), kv(&tags, "--tag")?, job_id)?;
            if filter.is_empty() {
                bail!("say what to cancel: an ID, --tag K=V or --job-id N");
            }
            let report = cancel_matching(&store, &filter, &reason, SettledBy::Operator).await?;
            json!(report)
        }
        PromiseCmd::Adopt { id, run } => {
            let id = PromiseId::parse(&id).map_err(anyhow::Error::msg)?;
            let run = runbridge::domain::RunId::new(run).map_err(anyhow::Error::msg)?;
            let jobs = startup::jobs_client(s, Some(Arc::new(store.clone())))?;
            let first_poll = Duration::from_millis(s.reconciler.first_poll_ms);
            runbridge::audit::adopt::adopt(&store, &jobs, &id, run, first_poll)
                .await?
                .to_json()
        }
        PromiseCmd::Retry { id } => {
            use runbridge::sidecar::progress::{RetryNow, retry_promise};
            let id = PromiseId::parse(&id).map_err(anyhow::Error::msg)?;
            match retry_promise(&store, &id).await? {
                RetryNow::Scheduled(p) => p.to_json(),
                RetryNow::NotFound => bail!("no promise {id}"),
                RetryNow::NotWaiting(why) => bail!("{why}"),
            }
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `runbridge audit`: true when nothing was found.
async fn audit(settings: &Settings, a: AuditArgs) -> Result<bool> {
    use runbridge::audit::{Auditor, Mode, parse_window, render};
    settings.validate(Role::Client)?;
    let window = parse_window(&a.since).map_err(anyhow::Error::msg)?;
    let workspaces: Vec<String> = match a.workspace {
        Some(w) if settings.databricks.workspaces.contains_key(&w) => vec![w],
        Some(w) => bail!(
            "unknown workspace {w:?}: configured are {:?}",
            settings.databricks.workspaces.keys().collect::<Vec<_>>()
        ),
        None => settings.databricks.workspaces.keys().cloned().collect(),
    };
    let store = startup::store(settings).await?;
    let jobs = startup::jobs_client(settings, Some(Arc::new(store.clone())))?;
    let auditor = Auditor::new(store, jobs, startup::audit_settings(settings));
    let since = chrono::Utc::now().timestamp_millis()
        - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let mode = if a.fix { Mode::Act } else { Mode::ReportOnly };
    let mut reports = Vec::new();
    for ws in &workspaces {
        let r = auditor
            .audit(ws, since, mode)
            .await
            .with_context(|| format!("auditing workspace {ws:?}"))?;
        reports.push(r);
    }
    if a.json {
        for f in reports.iter().flat_map(|r| &r.findings) {
            println!("{}", serde_json::to_string(f)?);
        }
    } else {
        print!("{}", render(&reports));
    }
    Ok(reports.iter().all(|r| r.findings.is_empty()))
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let mut settings = Settings::load().context("loading configuration")?;
    if matches!(cli.command, Command::Check(_)) {
        // The check declares queues passively: a missing one closes its
        // channel, which lapin logs as an error; the table says it.
        settings.log.level = format!("{},lapin=off", settings.log.level);
    }
    let tracing = runbridge::telemetry::init(&settings.log, &settings.telemetry)?;
    let result = run(cli, settings).await;
    tracing.shutdown();
    Ok(if result? {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Runs the subcommand; `Ok(false)`: it ran, and says the process should
/// exit 1 (`check` found something to change).
async fn run(cli: Cli, settings: Settings) -> Result<bool> {
    if settings.development
        && matches!(
            cli.command,
            Command::Worker | Command::Sidecar | Command::All
        )
    {
        tracing::warn!(
            "development mode (RUNBRIDGE_ENV=local): the development secrets committed in config/local.toml are accepted; never expose this process to others"
        );
    }
    match cli.command {
        Command::Worker => {
            let shutdown = runbridge::shutdown::on_signals();
            startup::run_worker(&settings, shutdown).await?;
        }
        Command::Sidecar => {
            let shutdown = runbridge::shutdown::on_signals();
            startup::run_sidecar(&settings, None, shutdown).await?;
        }
        Command::All => {
            settings.validate(Role::Worker)?;
            settings.validate(Role::Sidecar)?;
            let shutdown = runbridge::shutdown::on_signals();
            let s = Arc::new(settings);
            // Either half ending (an error at start-up, or a signal) stops the
            // other, so the process never lives on half-working.
            let (w, sc) = tokio::join!(
                async {
                    let r = startup::run_worker(&s, shutdown.clone()).await;
                    shutdown.cancel();
                    r
                },
                async {
                    let r = startup::run_sidecar(&s, None, shutdown.clone()).await;
                    shutdown.cancel();
                    r
                }
            );
            w?;
            sc?;
        }
        Command::Emulate(a) => emulate(&settings, *a).await?,
        Command::Trigger(a) => {
            settings.validate(Role::Client)?;
            trigger(&settings, a).await?;
        }
        Command::Promise(cmd) => {
            settings.validate(Role::Client)?;
            promise(&settings, cmd).await?;
        }
        Command::Schema(a) => schema(&settings, a)?,
        Command::Audit(a) => return audit(&settings, a).await,
        Command::Check(a) => {
            let report = runbridge::check::run(&settings, &a.job_ids, a.workspace.as_deref()).await;
            print!("{}", report.render());
            return Ok(!report.failed());
        }
    }
    Ok(true)
}
