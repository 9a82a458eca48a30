//! The launch request: the producer's parameters plus the three values a run
//! needs to call back (promise id, callback URL, callback token), passed the
//! way the job can receive them.
//!
//! Databricks refuses task parameters (`notebook_params`) for a job that
//! defines job parameters, and job parameters for a job that defines none
//! (the rule the Databricks CLI enforces before `run-now`: "If a job uses job
//! parameters, it cannot use task parameters"). A job parameter reaches the
//! notebook only under a name the job defines. So the worker learns each
//! job's style from `jobs/get` ([`JobStyles`], cached, refreshed when
//! Databricks refuses a launch's parameters) and:
//! - job defines job parameters: the three go as `job_parameters`, those
//!   the job defines; a missing one is warned about once per job;
//! - job defines none: the three go as `notebook_params`;
//! - the producer chose a style the job does not take: sent as chosen
//!   (with the three values), so Databricks' refusal reaches the producer
//!   in the rejection.
//!
//! A run that cannot receive the values still runs, and its promise settles
//! through the reconciler (final state, exit value).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::databricks::{DatabricksError, JobInfo, Jobs, LaunchRequest, ParameterStyle};
use crate::domain::{Launch, Parameters};

use super::ParamNames;

/// How long a job's parameter style is trusted before `jobs/get` again.
const STYLE_TTL: Duration = Duration::from_secs(300);

/// What the worker knows of each job: its parameter style, and which jobs
/// it already warned about. Shared by every delivery of the process.
#[derive(Debug, Clone, Default)]
pub struct JobStyles {
    inner: Arc<Mutex<StylesInner>>,
}

#[derive(Debug, Default)]
struct StylesInner {
    known: HashMap<(String, u64), (Instant, ParameterStyle)>,
    warned: HashSet<(String, u64)>,
}

impl JobStyles {
    fn lock(&self) -> std::sync::MutexGuard<'_, StylesInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, workspace: &str, job_id: u64) -> Option<ParameterStyle> {
        let g = self.lock();
        g.known
            .get(&(workspace.to_owned(), job_id))
            .filter(|(at, _)| at.elapsed() < STYLE_TTL)
            .map(|(_, s)| s.clone())
    }

    /// Forgets a job's style (Databricks refused the parameters sent).
    pub fn forget(&self, workspace: &str, job_id: u64) {
        self.lock().known.remove(&(workspace.to_owned(), job_id));
    }

    /// The job's style: cached, else from `jobs/get`. `Ok(None)` when
    /// Databricks will not describe the job (no such job, no permission to
    /// view it): the launch then goes as the producer wrote it, and
    /// `run-now` gives the real answer.
    pub async fn style<J: Jobs>(
        &self,
        jobs: &J,
        workspace: &str,
        job_id: u64,
    ) -> Result<Option<ParameterStyle>, DatabricksError> {
        if let Some(s) = self.cached(workspace, job_id) {
            return Ok(Some(s));
        }
        match jobs.get_job(workspace, job_id).await {
            Ok(job) => {
                let style = job.settings.parameter_style();
                self.warn_once(workspace, &job, &style);
                self.lock().known.insert(
                    (workspace.to_owned(), job_id),
                    (Instant::now(), style.clone()),
                );
                Ok(Some(style))
            }
            Err(e @ (DatabricksError::Transient { .. } | DatabricksError::Credentials { .. })) => {
                Err(e)
            }
            Err(e) => {
                tracing::debug!(job_id, error = %e, "jobs/get refused; launching as the trigger says");
                Ok(None)
            }
        }
    }

    fn warn_once(&self, workspace: &str, job: &JobInfo, style: &ParameterStyle) {
        let problem = match style {
            ParameterStyle::Job { .. } => None,
            ParameterStyle::Task if job.settings.tasks.is_empty() => None,
            ParameterStyle::Task => {
                let notebooks = job
                    .settings
                    .tasks
                    .iter()
                    .any(|t| t.kind() == "notebook_task");
                (!notebooks).then(|| {
                    "it defines no job parameters and has no notebook task, so task parameters (notebook_params) reach none of its tasks: define job parameters promise_id, url and callback_token (empty defaults) on the job".to_string()
                })
            }
        };
        let Some(problem) = problem else { return };
        if self
            .lock()
            .warned
            .insert((workspace.to_owned(), job.job_id))
        {
            tracing::warn!(
                workspace,
                job_id = job.job_id,
                "runs of this job cannot call back: {problem}; they still run, and settle when the reconciler sees them end (their exit value)"
            );
        }
    }

    /// Warns once per job that defines job parameters but not these.
    fn warn_missing(&self, workspace: &str, job_id: u64, missing: &[&str]) {
        if missing.is_empty() {
            return;
        }
        if self.lock().warned.insert((workspace.to_owned(), job_id)) {
            tracing::warn!(
                workspace,
                job_id,
                missing = %missing.join(", "),
                "runs of this job cannot call back: it defines job parameters but not the ones named in `missing`, and Databricks passes a notebook only the job parameters a job defines; add them to the job (empty defaults); its runs still run, and settle when the reconciler sees them end (their exit value)"
            );
        }
    }
}

/// Builds the launch: the producer's parameters, plus `extra` (the three
/// callback values, by their configured names) where the job takes them.
pub fn launch_request(
    run: &Launch,
    extra: BTreeMap<String, String>,
    style: Option<&ParameterStyle>,
    styles: &JobStyles,
    workspace: &str,
) -> LaunchRequest {
    match run {
        Launch::RunNow { job_id, params } => {
            let (job, notebook) = match (params, style) {
                // Unknown style: where the producer put them (job
                // parameters when it gave neither).
                (Parameters::Job(p), None) => (Some(with(p, extra)), None),
                (Parameters::Notebook(p), None) => (None, Some(with(p, extra))),
                (Parameters::Job(p), Some(ParameterStyle::Task)) if p.is_empty() => {
                    (None, Some(extra))
                }
                (Parameters::Notebook(p), Some(ParameterStyle::Task)) => {
                    (None, Some(with(p, extra)))
                }
                (Parameters::Job(p), Some(ParameterStyle::Job { defined })) => {
                    let missing: Vec<&str> = extra
                        .keys()
                        .filter(|k| !defined.contains(k))
                        .map(String::as_str)
                        .collect();
                    styles.warn_missing(workspace, *job_id, &missing);
                    let mut p = p.clone();
                    p.extend(extra.into_iter().filter(|(k, _)| defined.contains(k)));
                    (Some(p), None)
                }
                (Parameters::Notebook(p), Some(ParameterStyle::Job { defined }))
                    if p.is_empty() =>
                {
                    (
                        Some(
                            extra
                                .into_iter()
                                .filter(|(k, _)| defined.contains(k))
                                .collect(),
                        ),
                        None,
                    )
                }
                // The producer chose a style the job does not take: as
                // chosen, with the callback values, for Databricks to
                // refuse (the producer hears why) or, if it takes them, for
                // the run to call back.
                (Parameters::Job(p), Some(ParameterStyle::Task)) => (Some(with(p, extra)), None),
                (Parameters::Notebook(p), Some(ParameterStyle::Job { .. })) => {
                    (None, Some(with(p, extra)))
                }
            };
            LaunchRequest::RunNow {
                job_id: *job_id,
                job_parameters: job,
                notebook_params: notebook,
            }
        }
        Launch::Submit { body } => {
            let mut body = body.clone();
            add_submit_params(&mut body, &extra);
            LaunchRequest::Submit(body)
        }
    }
}

fn with(p: &BTreeMap<String, String>, extra: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut p = p.clone();
    p.extend(extra);
    p
}

/// The three values by their configured names.
pub fn callback_values(
    names: &ParamNames,
    promise_id: &str,
    url: String,
    token: &str,
) -> BTreeMap<String, String> {
    [
        (names.promise_id.clone(), promise_id.to_owned()),
        (names.url.clone(), url),
        (names.callback_token.clone(), token.to_owned()),
    ]
    .into()
}

/// A one-time run has no job parameters: the three go to every notebook
/// task's `base_parameters` (and a legacy top-level `notebook_task`).
pub fn add_submit_params(
    body: &mut serde_json::Map<String, Value>,
    extra: &BTreeMap<String, String>,
) {
    let add = |task: &mut Value| {
        if let Some(nb) = task.get_mut("notebook_task").and_then(Value::as_object_mut) {
            let bp = nb.entry("base_parameters").or_insert_with(|| json!({}));
            if let Some(bp) = bp.as_object_mut() {
                for (k, v) in extra {
                    bp.insert(k.clone(), json!(v));
                }
            }
        }
    };
    if let Some(tasks) = body.get_mut("tasks").and_then(Value::as_array_mut) {
        tasks.iter_mut().for_each(add);
    }
    let mut top = Value::Object(std::mem::take(body));
    add(&mut top);
    if let Value::Object(m) = top {
        *body = m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Envelope, Trigger, TriggerRules};

    fn trigger(json: &str) -> Trigger {
        let env = Envelope {
            body: json.as_bytes().to_vec(),
            ..Default::default()
        };
        Trigger::parse(&env, &TriggerRules::default()).unwrap()
    }

    fn extra() -> BTreeMap<String, String> {
        callback_values(&ParamNames::default(), "p1", "http://cb/x".into(), "v1.t")
    }

    fn job_style(names: &[&str]) -> ParameterStyle {
        ParameterStyle::Job {
            defined: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    type Params = Option<BTreeMap<String, String>>;

    /// The run-now parameters of `t` for a job with `style` (no
    /// per-job configuration, workspace `w`).
    fn run_now_for(t: &Trigger, style: Option<&ParameterStyle>) -> (Params, Params) {
        run_now(launch_request(
            t.launch().unwrap(),
            extra(),
            style,
            &JobStyles::default(),
            "w",
        ))
    }

    fn run_now(req: LaunchRequest) -> (Params, Params) {
        match req {
            LaunchRequest::RunNow {
                job_parameters,
                notebook_params,
                ..
            } => (job_parameters, notebook_params),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_job_without_job_parameters_gets_notebook_params() {
        let t = trigger(r#"{"id":"p1","job_id":7}"#);
        let (jp, np) = run_now_for(&t, Some(&ParameterStyle::Task));
        assert_eq!(jp, None);
        assert_eq!(np.unwrap()["promise_id"], "p1");
    }

    #[test]
    fn a_job_with_job_parameters_gets_the_ones_it_defines() {
        let t = trigger(r#"{"id":"p1","job_id":7,"job_parameters":{"date":"d"}}"#);
        let style = job_style(&["date", "promise_id", "url"]);
        let (jp, np) = run_now_for(&t, Some(&style));
        let jp = jp.unwrap();
        assert_eq!(np, None);
        assert_eq!(jp["date"], "d");
        assert_eq!(jp["url"], "http://cb/x");
        assert!(!jp.contains_key("callback_token"), "not defined by the job");
        // Empty notebook params on such a job become job parameters.
        let t = trigger(r#"{"id":"p1","job_id":7,"notebook_params":{}}"#);
        let (jp, np) = run_now_for(&t, Some(&style));
        assert_eq!(np, None);
        assert_eq!(jp.unwrap()["promise_id"], "p1");
    }

    #[test]
    fn a_producer_style_the_job_refuses_is_sent_as_chosen_with_the_callback_values() {
        let t = trigger(r#"{"id":"p1","job_id":7,"job_parameters":{"date":"d"}}"#);
        let (jp, np) = run_now_for(&t, Some(&ParameterStyle::Task));
        let jp = jp.unwrap();
        assert_eq!(jp.len(), 4, "{jp:?}");
        assert_eq!(jp["promise_id"], "p1");
        assert_eq!(np, None);
        // Unknown style: as before, where the producer put them.
        let (jp, _) = run_now_for(&t, None);
        assert_eq!(jp.unwrap().len(), 4);
        let t = trigger(r#"{"id":"p1","job_id":7,"notebook_params":{"date":"d"}}"#);
        let (jp, np) = run_now_for(&t, Some(&job_style(&["promise_id"])));
        assert_eq!(jp, None);
        assert_eq!(np.unwrap()["callback_token"], "v1.t");
    }

    #[test]
    fn submit_params_go_to_every_notebook_task() {
        let mut body = serde_json::from_value::<serde_json::Map<String, Value>>(json!({
            "run_name": "x",
            "tasks": [
                {"task_key": "a", "notebook_task": {"notebook_path": "/a"}},
                {"task_key": "b", "spark_python_task": {"python_file": "b.py"}},
                {"task_key": "c", "notebook_task": {"notebook_path": "/c", "base_parameters": {"k": "v"}}}
            ]
        }))
        .unwrap();
        let extra = BTreeMap::from([("promise_id".to_string(), "p1".to_string())]);
        add_submit_params(&mut body, &extra);
        assert_eq!(
            body["tasks"][0]["notebook_task"]["base_parameters"]["promise_id"],
            "p1"
        );
        assert!(body["tasks"][1].get("notebook_task").is_none());
        assert_eq!(
            body["tasks"][2]["notebook_task"]["base_parameters"]["k"],
            "v"
        );
        assert_eq!(
            body["tasks"][2]["notebook_task"]["base_parameters"]["promise_id"],
            "p1"
        );
        assert_eq!(body["run_name"], "x");
    }
}
