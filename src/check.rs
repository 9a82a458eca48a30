//! `runbridge check`: is this deployment ready for its workspace? It reads,
//! and changes nothing:
//!
//! - the configuration (loaded and validated for a worker and a sidecar);
//! - RabbitMQ: every exchange and queue of the topology, with the arguments
//!   runbridge needs (quorum queues, the delivery limit);
//! - Redis: `maxmemory-policy` must be `noeviction` (an evicting policy
//!   deletes promises under memory pressure, silently), and AOF on (or the
//!   risk stated: a restart loses what was not replicated);
//! - each workspace: one cheap authenticated call (SCIM `Me`);
//! - each `--job-id`: the job exists, how it receives parameters and whether
//!   it defines `promise_id` / `url` / `callback_token`, its tasks and the
//!   configured output task, `max_concurrent_runs` and queueing.
//!
//! The result is a table of what is ready and what to change; the process
//! exits non-zero when anything must change. The findings are pure
//! functions of what was read ([`job_findings`], [`redis_findings`]), tested
//! without a network.

use std::fmt::Write as _;

use serde_json::Value;

use crate::broker::Found;
use crate::config::{Role, Settings};
use crate::databricks::{DatabricksError, JobInfo, JobTask, Jobs, ParameterStyle};
use crate::startup;
use crate::store::PromiseStore;
use crate::worker::ParamNames;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One thing checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `config`, `rabbitmq`, `redis`, `workspace default`, `job 123`.
    pub area: String,
    pub item: String,
    pub level: Level,
    /// What was found, and for a warning or failure what to change.
    pub detail: String,
}

fn finding(area: &str, item: &str, level: Level, detail: impl Into<String>) -> Finding {
    Finding {
        area: area.into(),
        item: item.into(),
        level,
        detail: detail.into(),
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// Something must change before this deployment works.
    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Fail)
    }

    /// The table, one finding a line, then a verdict.
    pub fn render(&self) -> String {
        let w = |f: fn(&Finding) -> usize| self.findings.iter().map(f).max().unwrap_or(0);
        let (wa, wi) = (w(|f| f.area.len()), w(|f| f.item.len()));
        let mut out = String::new();
        for f in &self.findings {
            let _ = writeln!(
                out,
                "{:<4}  {:<wa$}  {:<wi$}  {}",
                f.level.label(),
                f.area,
                f.item,
                f.detail
            );
        }
        let (fails, warns) = (
            self.findings
                .iter()
                .filter(|f| f.level == Level::Fail)
                .count(),
            self.findings
                .iter()
                .filter(|f| f.level == Level::Warn)
                .count(),
        );
        let warnings = match warns {
            1 => "1 warning".to_string(),
            n => format!("{n} warnings"),
        };
        let _ = writeln!(
            out,
            "\n{}",
            if fails == 0 {
                format!("ready ({warnings})")
            } else {
                format!("not ready: {fails} to change, {warnings}")
            }
        );
        out
    }
}

/// What Redis's settings mean for promises (`None`: the server would not
/// say).
pub fn redis_findings(policy: Option<&str>, appendonly: Option<&str>) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(match policy {
        Some("noeviction") => finding("redis", "maxmemory-policy", Level::Ok, "noeviction"),
        Some(p) => finding(
            "redis",
            "maxmemory-policy",
            Level::Fail,
            format!("{p}: under memory pressure Redis deletes keys, and pending promises vanish without an event; set maxmemory-policy noeviction (writes then fail loudly and are retried)"),
        ),
        None => finding(
            "redis",
            "maxmemory-policy",
            Level::Warn,
            "the server does not say (CONFIG GET refused): make sure it is noeviction",
        ),
    });
    out.push(match appendonly {
        Some("yes") => finding("redis", "appendonly", Level::Ok, "yes (AOF)"),
        Some(v) => finding(
            "redis",
            "appendonly",
            Level::Warn,
            format!("{v}: a restart of this Redis loses what it held since its last snapshot; turn AOF on, or run replicas with redis.wait_replicas >= 1"),
        ),
        None => finding(
            "redis",
            "appendonly",
            Level::Warn,
            "the server does not say (CONFIG GET refused): make sure writes are persisted or replicated",
        ),
    });
    out
}

/// Task kinds that receive a job's parameters as they are (Databricks'
/// "Configure job parameters": notebook widgets, Python wheel keyword
/// arguments, SQL parameters, a Run Job task's job parameters).
const RECEIVE_JOB_PARAMETERS: &[&str] = &[
    "notebook_task",
    "python_wheel_task",
    "sql_task",
    "run_job_task",
];

/// Does this task receive the callback values: by its kind, or because its
/// own parameters pass every one of them as `{{job.parameters.<name>}}`?
fn receives_job_parameters(task: &JobTask, wanted: &[&String]) -> bool {
    if RECEIVE_JOB_PARAMETERS.contains(&task.kind()) {
        return true;
    }
    let text = task
        .rest
        .get(task.kind())
        .map(Value::to_string)
        .unwrap_or_default();
    wanted
        .iter()
        .all(|n| text.contains(&format!("{{{{job.parameters.{n}}}}}")))
}

/// What a job's definition means for runbridge's runs of it (pure).
pub fn job_findings(
    job: &JobInfo,
    names: &ParamNames,
    output_task_key: Option<&str>,
) -> Vec<Finding> {
    let area = format!("job {}", job.job_id);
    let s = &job.settings;
    let mut out = vec![finding(
        &area,
        "exists",
        Level::Ok,
        s.name.clone().unwrap_or_else(|| "(no name)".into()),
    )];
    let wanted = [&names.promise_id, &names.url, &names.callback_token];
    let notebooks = s.tasks.iter().any(|t| t.kind() == "notebook_task");
    out.push(match s.parameter_style() {
        ParameterStyle::Job { defined } => {
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|n| !defined.contains(n))
                .map(|n| n.as_str())
                .collect();
            let reached = s.tasks.is_empty() || s.tasks.iter().any(|t| receives_job_parameters(t, &wanted));
            if missing.is_empty() && reached {
                finding(
                    &area,
                    "parameters",
                    Level::Ok,
                    format!(
                        "job parameters, with {}: runs can call back",
                        wanted.map(|n| n.as_str()).join(", ")
                    ),
                )
            } else if missing.is_empty() {
                finding(
                    &area,
                    "parameters",
                    Level::Fail,
                    format!(
                        "job parameters, but none of its tasks receives them: job parameters reach notebook, Python wheel (as keyword arguments), SQL and Run Job tasks, and other tasks only through their own parameters; pass {} to a task as {}",
                        wanted.map(|n| n.as_str()).join(", "),
                        wanted
                            .map(|n| format!("\"--{n}\", \"{{{{job.parameters.{n}}}}}\""))
                            .join(", ")
                    ),
                )
            } else {
                finding(
                    &area,
                    "parameters",
                    Level::Fail,
                    format!(
                        "job parameters without {}: a run receives only the job parameters its job defines, so these runs cannot call back (they settle only when they end, by exit value); add job parameters {} with empty defaults",
                        missing.join(", "),
                        missing.join(", ")
                    ),
                )
            }
        }
        ParameterStyle::Task if notebooks => finding(
            &area,
            "parameters",
            Level::Ok,
            format!(
                "no job parameters: {} go to its notebook tasks as notebook_params",
                wanted.map(|n| n.as_str()).join(", ")
            ),
        ),
        ParameterStyle::Task => finding(
            &area,
            "parameters",
            Level::Fail,
            format!(
                "no job parameters and no notebook task: notebook_params reach none of its tasks; define job parameters {} with empty defaults",
                wanted.map(|n| n.as_str()).join(", ")
            ),
        ),
    });
    let keys: Vec<String> = s
        .tasks
        .iter()
        .map(|t| format!("{} ({})", t.task_key, t.kind()))
        .collect();
    out.push(match (s.tasks.len(), output_task_key) {
        (0, _) => finding(&area, "tasks", Level::Fail, "none: nothing would run"),
        (n, Some(k)) if n > 1 && !s.tasks.iter().any(|t| t.task_key == k) => finding(
            &area,
            "tasks",
            Level::Fail,
            format!(
                "{}; reconciler.output_task_key = {k:?} names none of them: runs without callback would resolve with no value",
                keys.join(", ")
            ),
        ),
        (1, _) | (_, Some(_)) => finding(&area, "tasks", Level::Ok, keys.join(", ")),
        (_, None) => finding(
            &area,
            "tasks",
            Level::Warn,
            format!(
                "{}; a run that ends without calling back resolves with every task's exit value as a {{task_key: value}} object: set reconciler.output_task_key to use one task's",
                keys.join(", ")
            ),
        ),
    });
    let queue = s.queue.as_ref().is_some_and(|q| q.enabled);
    out.push(match (s.max_concurrent_runs, queue) {
        // "Setting this value to 0 causes all new runs to be skipped"
        // (`JobSettings.max_concurrent_runs`, Databricks' Python SDK).
        (Some(0), _) => finding(
            &area,
            "concurrency",
            Level::Fail,
            "max_concurrent_runs 0: Databricks skips every new run of this job, queued or not, and each trigger's promise is rejected; set it to 1 or more",
        ),
        (Some(n), _) if n > 1 => finding(
            &area,
            "concurrency",
            Level::Ok,
            format!(
                "max_concurrent_runs {n}, queueing {}",
                if queue { "on" } else { "off: a trigger over the limit is SKIPPED and rejected" }
            ),
        ),
        (n, true) => finding(
            &area,
            "concurrency",
            Level::Warn,
            format!(
                "max_concurrent_runs {} (Databricks' default is 1), queueing on: triggers run one at a time, the rest wait QUEUED; raise max_concurrent_runs for parallel runs",
                n.unwrap_or(1)
            ),
        ),
        (n, false) => finding(
            &area,
            "concurrency",
            Level::Fail,
            format!(
                "max_concurrent_runs {} (Databricks' default is 1), queueing off: a trigger that arrives while a run is active is SKIPPED and its promise rejected; raise max_concurrent_runs or turn queueing on",
                n.unwrap_or(1)
            ),
        ),
    });
    out
}

fn databricks_detail(e: &DatabricksError) -> String {
    match e {
        DatabricksError::Credentials { .. } => {
            format!("{e}: set a valid token (or OAuth client) for this workspace")
        }
        other => other.to_string(),
    }
}

/// Runs every check. `jobs`: job ids to look at, in `workspace` (the
/// default workspace when `None`).
/// Whether anyone listens to the events: a relay notes when a completion
/// event came back unroutable (no queue bound to the events exchange for
/// it) and clears the note once one is routed. AMQP cannot list an
/// exchange's bindings, so this is what the relays saw.
fn listener_finding(
    unroutable: Result<Option<i64>, crate::store::StoreError>,
    exchange: &str,
) -> Finding {
    match unroutable {
        Ok(None) => finding(
            "rabbitmq",
            "event listeners",
            Level::Ok,
            format!(
                "no completion event came back unroutable from {exchange} since one was last routed"
            ),
        ),
        Ok(Some(at)) => {
            let ago = (chrono::Utc::now().timestamp_millis() - at).max(0) / 1000;
            finding(
                "rabbitmq",
                "event listeners",
                Level::Warn,
                format!(
                    "completion events come back unroutable (the last {ago} s ago): no queue is bound to {exchange} for them; they wait in the outbox until one is (bind your consumers' queue with promise.#)"
                ),
            )
        }
        Err(e) => finding(
            "rabbitmq",
            "event listeners",
            Level::Warn,
            format!("could not read: {e}"),
        ),
    }
}

pub async fn run(settings: &Settings, job_ids: &[u64], workspace: Option<&str>) -> Report {
    let mut r = Report::default();
    for role in [Role::Worker, Role::Sidecar] {
        if let Err(e) = settings.validate(role) {
            r.findings
                .push(finding("config", "valid", Level::Fail, e.to_string()));
        }
    }
    if !r.failed() {
        r.findings.push(finding(
            "config",
            "valid",
            Level::Ok,
            format!("public_url {}", settings.sidecar.public_url),
        ));
    }

    let bs = startup::broker_settings(settings, "check");
    match crate::broker::Broker::connect(&bs).await {
        Ok(b) => {
            for t in b.check_topology().await {
                let level = match t.state {
                    Found::Ready => Level::Ok,
                    Found::Missing => Level::Warn,
                    Found::Wrong => Level::Fail,
                };
                r.findings
                    .push(finding("rabbitmq", &t.object, level, t.detail));
            }
            b.close().await;
        }
        Err(e) => r
            .findings
            .push(finding("rabbitmq", "connect", Level::Fail, e.to_string())),
    }

    match startup::store(settings).await {
        Ok(store) => match store.ping().await {
            Ok(()) => {
                let policy = store.server_setting("maxmemory-policy").await;
                let aof = store.server_setting("appendonly").await;
                match (policy, aof) {
                    (Ok(p), Ok(a)) => {
                        r.findings
                            .extend(redis_findings(p.as_deref(), a.as_deref()));
                        r.findings.push(listener_finding(
                            store.events_unroutable().await,
                            &settings.amqp.events_exchange,
                        ));
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        r.findings
                            .push(finding("redis", "settings", Level::Fail, e.to_string()))
                    }
                }
            }
            Err(e) => r
                .findings
                .push(finding("redis", "connect", Level::Fail, e.to_string())),
        },
        Err(e) => r
            .findings
            .push(finding("redis", "connect", Level::Fail, e.to_string())),
    }

    let client = match startup::jobs_client(settings, None) {
        Ok(c) => c,
        Err(e) => {
            r.findings
                .push(finding("databricks", "client", Level::Fail, e.to_string()));
            return r;
        }
    };
    let mut names: Vec<&String> = settings.databricks.workspaces.keys().collect();
    names.sort();
    for name in names {
        let area = format!("workspace {name}");
        r.findings.push(match client.whoami(name).await {
            Ok(user) => finding(
                &area,
                "credentials",
                Level::Ok,
                format!("authenticated as {user}"),
            ),
            Err(e) => finding(&area, "credentials", Level::Fail, databricks_detail(&e)),
        });
    }
    let ws = workspace.unwrap_or(&settings.databricks.default_workspace);
    let params = ParamNames {
        promise_id: settings.databricks.param_promise_id.clone(),
        url: settings.databricks.param_url.clone(),
        callback_token: settings.databricks.param_callback_token.clone(),
    };
    let output_task_key =
        Some(settings.reconciler.output_task_key.as_str()).filter(|k| !k.is_empty());
    for id in job_ids {
        match client.get_job(ws, *id).await {
            Ok(job) => r
                .findings
                .extend(job_findings(&job, &params, output_task_key)),
            Err(e) => r.findings.push(finding(
                &format!("job {id}"),
                "exists",
                Level::Fail,
                format!("in workspace {ws}: {}", databricks_detail(&e)),
            )),
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::databricks::{JobParameterDefinition, JobSettings, JobTask, QueueSettings};

    fn task(key: &str, kind: &str) -> JobTask {
        let mut rest = serde_json::Map::new();
        rest.insert(kind.into(), serde_json::json!({}));
        JobTask {
            task_key: key.into(),
            rest,
        }
    }

    fn job(params: &[&str], tasks: Vec<JobTask>, max: Option<u64>, queue: bool) -> JobInfo {
        JobInfo {
            job_id: 7,
            settings: JobSettings {
                name: Some("nightly".into()),
                parameters: params
                    .iter()
                    .map(|n| JobParameterDefinition {
                        name: n.to_string(),
                        default: String::new(),
                    })
                    .collect(),
                tasks,
                max_concurrent_runs: max,
                queue: Some(QueueSettings { enabled: queue }),
            },
            next_page_token: None,
        }
    }

    fn level(fs: &[Finding], item: &str) -> Level {
        fs.iter().find(|f| f.item == item).map(|f| f.level).unwrap()
    }

    #[test]
    fn a_ready_job() {
        let j = job(
            &["promise_id", "url", "callback_token", "date"],
            vec![task("nb", "notebook_task")],
            Some(50),
            true,
        );
        let fs = job_findings(&j, &ParamNames::default(), None);
        assert!(fs.iter().all(|f| f.level == Level::Ok), "{fs:?}");
    }

    #[test]
    fn a_job_with_job_parameters_but_not_the_callback_ones() {
        let j = job(&["date"], vec![task("nb", "notebook_task")], Some(5), true);
        let fs = job_findings(&j, &ParamNames::default(), None);
        assert_eq!(level(&fs, "parameters"), Level::Fail);
        let d = &fs.iter().find(|f| f.item == "parameters").unwrap().detail;
        assert!(d.contains("promise_id, url, callback_token"), "{d}");
    }

    #[test]
    fn job_parameters_must_reach_a_task() {
        let all = ["promise_id", "url", "callback_token"];
        let python = job(&all, vec![task("py", "spark_python_task")], Some(5), true);
        let fs = job_findings(&python, &ParamNames::default(), None);
        assert_eq!(level(&fs, "parameters"), Level::Fail);
        let d = &fs.iter().find(|f| f.item == "parameters").unwrap().detail;
        assert!(d.contains("{{job.parameters.promise_id}}"), "{d}");
        // The task passes them on in its own parameters.
        let mut passed = task("py", "spark_python_task");
        passed.rest.insert(
            "spark_python_task".into(),
            serde_json::json!({"python_file": "x.py", "parameters": all.iter().flat_map(|n| [format!("--{n}"), format!("{{{{job.parameters.{n}}}}}")]).collect::<Vec<_>>()}),
        );
        let j = job(&all, vec![passed], Some(5), true);
        assert_eq!(
            level(
                &job_findings(&j, &ParamNames::default(), None),
                "parameters"
            ),
            Level::Ok
        );
        for kind in ["python_wheel_task", "sql_task", "run_job_task"] {
            let j = job(&all, vec![task("t", kind)], Some(5), true);
            assert_eq!(
                level(
                    &job_findings(&j, &ParamNames::default(), None),
                    "parameters"
                ),
                Level::Ok,
                "{kind}"
            );
        }
    }

    #[test]
    fn a_job_without_job_parameters_needs_a_notebook_task() {
        let nb = job(&[], vec![task("nb", "notebook_task")], Some(5), true);
        assert_eq!(
            level(
                &job_findings(&nb, &ParamNames::default(), None),
                "parameters"
            ),
            Level::Ok
        );
        let wheel = job(&[], vec![task("w", "python_wheel_task")], Some(5), true);
        assert_eq!(
            level(
                &job_findings(&wheel, &ParamNames::default(), None),
                "parameters"
            ),
            Level::Fail
        );
    }

    #[test]
    fn tasks_and_the_output_task() {
        let two = job(
            &[],
            vec![task("a", "notebook_task"), task("b", "notebook_task")],
            Some(5),
            true,
        );
        let p = ParamNames::default();
        assert_eq!(level(&job_findings(&two, &p, None), "tasks"), Level::Warn);
        assert_eq!(
            level(&job_findings(&two, &p, Some("b")), "tasks"),
            Level::Ok
        );
        assert_eq!(
            level(&job_findings(&two, &p, Some("c")), "tasks"),
            Level::Fail
        );
    }

    #[test]
    fn concurrency_and_queueing() {
        let p = ParamNames::default();
        let t = || vec![task("nb", "notebook_task")];
        assert_eq!(
            level(
                &job_findings(&job(&[], t(), None, false), &p, None),
                "concurrency"
            ),
            Level::Fail
        );
        assert_eq!(
            level(
                &job_findings(&job(&[], t(), Some(1), true), &p, None),
                "concurrency"
            ),
            Level::Warn
        );
        assert_eq!(
            level(
                &job_findings(&job(&[], t(), Some(10), false), &p, None),
                "concurrency"
            ),
            Level::Ok
        );
        // Zero skips every run, whatever the queue.
        for queue in [true, false] {
            assert_eq!(
                level(
                    &job_findings(&job(&[], t(), Some(0), queue), &p, None),
                    "concurrency"
                ),
                Level::Fail,
                "queue {queue}"
            );
        }
    }

    #[test]
    fn redis_settings() {
        let fs = redis_findings(Some("allkeys-lru"), Some("no"));
        assert_eq!(level(&fs, "maxmemory-policy"), Level::Fail);
        assert_eq!(level(&fs, "appendonly"), Level::Warn);
        let fs = redis_findings(Some("noeviction"), Some("yes"));
        assert!(fs.iter().all(|f| f.level == Level::Ok));
        let r = Report {
            findings: redis_findings(Some("volatile-lru"), None),
        };
        assert!(r.failed());
        assert!(
            r.render().contains("not ready: 1 to change, 1 warning\n"),
            "{}",
            r.render()
        );
    }
}
