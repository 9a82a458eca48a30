//! B11: what one audit asks of Databricks, as a function of the runs
//! started in its window, and whether it stays in the workspace's poll
//! budget. Runs are started by hand on the emulator (each naming a promise
//! in Redis, half of them settled); one report-only audit then reads them.
//! The baseline is the fewest calls any audit needs: the window's runs at
//! 25 a page (`runs/list`'s most), and one page of the active runs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{StreamExt, stream};
use runbridge::audit::{Auditor, Mode};
use runbridge::domain::{Payload, PromiseId, SettledBy, State};
use runbridge::store::{PromiseStore, Settle, Timeout};
use serde_json::{Value, json};

use runbridge_testkit::free_port;

use crate::lab::{Env, new_promise, wait_port};
use crate::report::Row;

/// The poll budget the audit runs under (requests per second).
const BUDGET: f64 = 20.0;

pub(crate) async fn b11(env: &Env, runs: usize) -> Result<Row> {
    let port = free_port();
    let _emulator = env.spawn(
        "b11-emulator",
        &[
            "emulate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            // Ends at once with no output: the listing is what is measured.
            "--job",
            "1:success_no_output:0",
        ],
        &env.child_env("b11", None, &[]),
    )?;
    wait_port(port, "emulator").await?;
    let s = env.settings(
        "b11",
        &[
            (
                "databricks.workspaces.default.host",
                format!("http://127.0.0.1:{port}"),
            ),
            ("databricks.workspaces.default.token", "dapi-bench".into()),
            ("databricks.poll_per_second", BUDGET.to_string()),
            ("databricks.burst", "5".into()),
        ],
    )?;
    let store = runbridge::startup::store(&s).await?;
    let since = chrono::Utc::now().timestamp_millis() - 1_000;
    let http = reqwest::Client::new();
    let prefix = format!("{}-b11", env.run_id);
    let started: Vec<Result<()>> = stream::iter(0..runs)
        .map(|i| {
            let (store, http, prefix) = (&store, &http, &prefix);
            async move {
                let id = PromiseId::parse(&format!("{prefix}-{i:06}"))?;
                store
                    .create(&new_promise(&id, Timeout::After(Duration::from_secs(3600))))
                    .await?;
                if i % 2 == 0 {
                    store
                        .settle(&Settle {
                            id: id.clone(),
                            target: State::Resolved,
                            value: Payload::default(),
                            ikey: None,
                            strict: false,
                            settled_by: SettledBy::Operator,
                            cancel_run: false,
                            capability: None,
                        })
                        .await?;
                }
                let v: Value = http
                    .post(format!("http://127.0.0.1:{port}/api/2.2/jobs/run-now"))
                    .bearer_auth("dapi-bench")
                    .json(&json!({"job_id": 1, "job_parameters": {"promise_id": id.as_str()}}))
                    .send()
                    .await?
                    .json()
                    .await?;
                v["run_id"].as_u64().context("no run id")?;
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    started.into_iter().collect::<Result<Vec<()>>>()?;
    let jobs = runbridge::startup::jobs_client(&s, Some(std::sync::Arc::new(store.clone())))?;
    let mut settings = runbridge::startup::audit_settings(&s);
    settings.max_pages = 100_000;
    let auditor = Auditor::new(store, jobs, settings);
    let t = Instant::now();
    let report = auditor.audit("default", since, Mode::ReportOnly).await?;
    let took = t.elapsed().as_secs_f64();
    let least = runs.div_ceil(25) + 1;
    let rate = report.calls as f64 / took.max(0.001);
    let ratio = report.calls as f64 / least as f64;
    Ok(Row {
        id: "B11",
        cpu: Vec::new(),
        scenario: format!(
            "one audit of {runs} runs started in its window (half of their promises settled), poll budget {BUDGET}/s"
        ),
        runbridge: report.calls as f64,
        baseline: Some(least as f64),
        unit: "Databricks calls per audit",
        ratio: Some(ratio),
        target: format!("ratio ≤ 1.1, rate ≤ the budget ({BUDGET}/s, burst 5)"),
        met: ratio <= 1.1 && rate <= BUDGET + 5.0 / took.max(0.001),
        notes: format!(
            "baseline: runs/list's 25 a page, and a page of active runs; {} runs read in {took:.1} s, {rate:.1} calls/s",
            report.runs_seen
        ),
    })
}
