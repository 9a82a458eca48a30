//! The audit (docs/operating.md, the audit): the workspace checked against
//! the promises. Every run the bridge starts names its promise in its
//! parameters, and every promise names its runs, so the two can be held
//! side by side:
//!
//! 1. **List** the workspace's runs (`runs/list`, 25 a page, tasks
//!    expanded so a one-time run's parameters show): every active run,
//!    whenever it started, and every run started since the last audit
//!    (less an overlap). A run that names a promise is read with it.
//!    A run the last audit saw active and this one does not has ended
//!    since: it is read with `runs/get`, whenever it started.
//! 2. **Walk** the pending promises' recorded runs a few at a time (the
//!    walk goes on where the last audit left it): a run not listed above is
//!    read with `runs/get`, so a run that ended or vanished long ago is
//!    found too.
//! 3. **Classify** each pair ([`classify::classify_run`]): orphan, duplicate,
//!    mismatch, lost, or nothing, with a grace period for what just happened.
//! 4. **Act** as configured per kind ([`Action`]): report, cancel the run
//!    through the reconciler's cancel schedule, or make the promise's run
//!    check due so the reconciler settles it. Each finding is kept in the
//!    workspace's findings hash, published once as an
//!    `io.runbridge.audit.finding` event and counted.
//!
//! In `runbridge worker`, one worker at a time audits each workspace (its
//! audit lease), every `audit.interval_ms`; `runbridge audit` runs the same
//! audit once from the command line. The audit's calls are `runs/list` pages
//! and `runs/get`s, in the workspace's poll budget like every check.

pub mod adopt;
pub mod classify;
pub mod finding;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::databricks::{DatabricksError, Jobs, RunInfo, RunsQuery};
use crate::domain::{Promise, PromiseId, RunId};
use crate::shutdown::pause;
use crate::store::{Audits, PromiseStore, StoreError};
pub use classify::{FindingKind, Margins, PromiseSide, RunSide, classify_run, incarnation_of};
pub use finding::{Action, Finding, finding_id};

/// What to do with each kind of finding (`[audit.actions]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actions {
    pub orphan: Action,
    pub duplicate: Action,
    pub mismatch: Action,
    pub lost: Action,
}

impl Default for Actions {
    fn default() -> Self {
        Self {
            orphan: Action::Cancel,
            duplicate: Action::Cancel,
            mismatch: Action::Report,
            lost: Action::Settle,
        }
    }
}

impl Actions {
    pub fn of(&self, kind: FindingKind) -> Action {
        match kind {
            FindingKind::Orphan => self.orphan,
            FindingKind::Duplicate => self.duplicate,
            FindingKind::Mismatch => self.mismatch,
            FindingKind::Lost => self.lost,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub interval: Duration,
    /// How far back the first audit of a workspace lists.
    pub lookback: Duration,
    /// How far before the last audit's start the next one lists again.
    pub overlap: Duration,
    pub grace: Duration,
    pub lost_after: Duration,
    /// `runs/list` pages per listing at most (25 runs each).
    pub max_pages: usize,
    /// Pending promises' runs read with `runs/get` per audit at most.
    pub max_checks: usize,
    /// A finding no audit has seen for this long is forgotten.
    pub keep: Duration,
    /// Findings kept per workspace at most (more are counted, not kept).
    pub max_findings: usize,
    pub actions: Actions,
    /// The run parameters that name the promise and carry its token.
    pub promise_param: String,
    pub token_param: String,
}

/// Where finding events go (the events exchange, in `runbridge worker`).
pub trait FindingSink: Send + Sync + 'static {
    /// Publishes one event, confirmed; `Err` leaves it for the next audit.
    fn publish<'a>(
        &'a self,
        routing_key: &'a str,
        id: &'a str,
        body: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Databricks(#[from] DatabricksError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One audit of one workspace.
#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub workspace: String,
    /// The listing's start (epoch ms).
    pub since: i64,
    pub runs_seen: usize,
    /// Databricks calls made (`runs/list` pages and `runs/get`s).
    pub calls: usize,
    /// The listing stopped at `audit.max_pages`.
    pub truncated: bool,
    pub findings: Vec<Finding>,
    /// Findings no earlier audit had seen.
    pub new: usize,
}

/// Whether an audit changes anything: the worker's and `runbridge audit
/// --fix` act and keep; plain `runbridge audit` only reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ReportOnly,
    Act,
}

/// A disagreement found, before it is acted on.
struct Observed {
    kind: FindingKind,
    reason: String,
    promise_id: String,
    promise: Option<PromiseSide>,
    run: RunSide,
    /// The incarnation the run's callback token names.
    created: Option<i64>,
}

pub struct Auditor<S, J> {
    store: S,
    jobs: J,
    settings: AuditSettings,
    sink: Option<Arc<dyn FindingSink>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<S: PromiseStore + Audits, J: Jobs> Auditor<S, J> {
    pub fn new(store: S, jobs: J, settings: AuditSettings) -> Self {
        Self {
            store,
            jobs,
            settings,
            sink: None,
        }
    }

    pub fn with_sink(mut self, sink: Arc<dyn FindingSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// Audits `workspace` once, listing the runs started since `since`
    /// (epoch ms) besides every active one.
    pub async fn audit(
        &self,
        workspace: &str,
        since: i64,
        mode: Mode,
    ) -> Result<AuditReport, AuditError> {
        let now = now_ms();
        let margins = Margins {
            now,
            grace_ms: ms(self.settings.grace),
            lost_after_ms: ms(self.settings.lost_after),
        };
        let mut report = AuditReport {
            workspace: workspace.to_owned(),
            since,
            ..Default::default()
        };
        let mut promises: HashMap<String, Option<Promise>> = HashMap::new();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut active: Vec<u64> = Vec::new();
        let mut observed = Vec::new();
        let was_active = self.store.audit_active(workspace).await?;
        for query in [RunsQuery::Active, RunsQuery::StartedSince(since)] {
            let mut token: Option<String> = None;
            for page_no in 0.. {
                if page_no >= self.settings.max_pages {
                    report.truncated = true;
                    break;
                }
                let page = self
                    .jobs
                    .list_runs(workspace, &query, token.as_deref())
                    .await?;
                report.calls += 1;
                for run in &page.runs {
                    // Active runs of either listing are kept: a run the
                    // window showed active may end before the next audit,
                    // whose window then starts after it did (and a listing
                    // paged while runs end can skip one).
                    if query == RunsQuery::Active || RunSide::of(run).is_active() {
                        active.push(run.run_id);
                    }
                    if seen.insert(run.run_id) {
                        report.runs_seen += 1;
                        self.look_at(workspace, run, &margins, &mut promises, &mut observed)
                            .await?;
                    }
                }
                match page.next_page_token.filter(|t| !t.is_empty()) {
                    Some(t) if page.has_more => token = Some(t),
                    _ => break,
                }
            }
        }
        // Runs the last audit saw active have ended since, and may have
        // started before this listing's window: each is read on its own.
        for run in was_active {
            let Ok(id) = RunId::new(run) else { continue };
            if !seen.insert(run) {
                continue;
            }
            report.calls += 1;
            match self.jobs.get_run(workspace, id).await {
                Ok(info) => {
                    report.runs_seen += 1;
                    self.look_at(workspace, &info, &margins, &mut promises, &mut observed)
                        .await?;
                }
                // Deleted since: nothing of it to hold against a promise.
                Err(e) if e.is_unknown_run() => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.walk_pending(workspace, &margins, &mut seen, &mut report, &mut observed)
            .await?;
        if mode == Mode::Act {
            self.store.set_audit_active(workspace, &active).await?;
        }
        let observed = self.confirm(workspace, &margins, observed).await?;
        self.act(workspace, now, observed, mode, &mut report)
            .await?;
        Ok(report)
    }

    async fn promise<'a>(
        &self,
        cache: &'a mut HashMap<String, Option<Promise>>,
        id: &PromiseId,
    ) -> Result<&'a Option<Promise>, StoreError> {
        if !cache.contains_key(id.as_str()) {
            let p = self.store.get(id).await?;
            cache.insert(id.to_string(), p);
        }
        Ok(&cache[id.as_str()])
    }

    async fn look_at(
        &self,
        workspace: &str,
        run: &RunInfo,
        margins: &Margins,
        cache: &mut HashMap<String, Option<Promise>>,
        out: &mut Vec<Observed>,
    ) -> Result<(), StoreError> {
        let Some(id) = run
            .parameter(&self.settings.promise_param)
            .and_then(|p| PromiseId::parse(p).ok())
        else {
            return Ok(());
        };
        // A promise of another workspace is not this run's.
        let promise = self
            .promise(cache, &id)
            .await?
            .as_ref()
            .filter(|p| p.workspace == workspace);
        let created = incarnation_of(run.parameter(&self.settings.token_param));
        let side = RunSide::of(run);
        if let Some(v) = classify_run(margins, &side, created, promise) {
            out.push(Observed {
                kind: v.kind,
                reason: v.reason,
                promise_id: id.to_string(),
                promise: promise.map(PromiseSide::of),
                run: side,
                created,
            });
        }
        Ok(())
    }

    /// Reads, with `runs/get`, the runs of pending promises that the
    /// listing did not show (started before the window, or deleted).
    async fn walk_pending(
        &self,
        workspace: &str,
        margins: &Margins,
        seen: &mut HashSet<u64>,
        report: &mut AuditReport,
        out: &mut Vec<Observed>,
    ) -> Result<(), AuditError> {
        if self.settings.max_checks == 0 {
            return Ok(());
        }
        let pairs = self
            .store
            .pending_runs(workspace, self.settings.max_checks)
            .await?;
        let mut checks = 0;
        for (run, id) in pairs {
            if checks >= self.settings.max_checks {
                break;
            }
            if seen.contains(&run.get()) {
                continue;
            }
            let Some(p) = self.store.get(&id).await? else {
                continue;
            };
            if p.workspace != workspace || p.state.is_settled() || p.run_id != Some(run) {
                continue;
            }
            checks += 1;
            report.calls += 1;
            seen.insert(run.get());
            let side = match self.jobs.get_run(workspace, run).await {
                Ok(info) => RunSide::of(&info),
                Err(e) if e.is_unknown_run() => {
                    let v = classify::gone(run.get());
                    out.push(Observed {
                        kind: v.kind,
                        reason: v.reason,
                        promise_id: id.to_string(),
                        promise: Some(PromiseSide::of(&p)),
                        run: RunSide::gone(run.get()),
                        created: None,
                    });
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(v) = classify_run(margins, &side, None, Some(&p)) {
                out.push(Observed {
                    kind: v.kind,
                    reason: v.reason,
                    promise_id: id.to_string(),
                    promise: Some(PromiseSide::of(&p)),
                    run: side,
                    created: None,
                });
            }
        }
        Ok(())
    }

    /// Reads each disagreement's promise again and classifies once more: a
    /// listing of many pages takes a while, and a promise the reconciler
    /// settled (or a worker recorded a run for) meanwhile is no finding.
    async fn confirm(
        &self,
        workspace: &str,
        margins: &Margins,
        observed: Vec<Observed>,
    ) -> Result<Vec<Observed>, StoreError> {
        let mut out = Vec::with_capacity(observed.len());
        for o in observed {
            let Ok(id) = PromiseId::parse(&o.promise_id) else {
                continue;
            };
            let fresh = self
                .store
                .get(&id)
                .await?
                .filter(|p| p.workspace == workspace);
            let m = Margins {
                now: now_ms(),
                ..*margins
            };
            let again = if o.run.state == "GONE" {
                fresh
                    .as_ref()
                    .filter(|p| {
                        !p.state.is_settled() && p.run_id.map(|r| r.get()) == Some(o.run.run_id)
                    })
                    .map(|_| classify::gone(o.run.run_id))
            } else {
                classify_run(&m, &o.run, o.created, fresh.as_ref())
            };
            if let Some(v) = again {
                out.push(Observed {
                    kind: v.kind,
                    reason: v.reason,
                    promise: fresh.as_ref().map(PromiseSide::of),
                    ..o
                });
            }
        }
        Ok(out)
    }

    async fn act(
        &self,
        workspace: &str,
        now: i64,
        observed: Vec<Observed>,
        mode: Mode,
        report: &mut AuditReport,
    ) -> Result<(), AuditError> {
        let act = mode == Mode::Act;
        for o in observed {
            let id = finding_id(o.kind, &o.promise_id, o.run.run_id);
            let known: Option<Finding> = if act {
                self.store
                    .finding(workspace, &id)
                    .await?
                    .and_then(|r| serde_json::from_str(&r).ok())
            } else {
                None
            };
            let action = if act {
                self.settings.actions.of(o.kind)
            } else {
                Action::Report
            };
            let mut f = Finding {
                id,
                kind: o.kind,
                workspace: workspace.to_owned(),
                promise_id: o.promise_id,
                reason: o.reason,
                promise: o.promise,
                run: o.run,
                action,
                first_seen: known
                    .as_ref()
                    .map_or_else(|| finding::rfc3339(now), |k| k.first_seen.clone()),
                last_seen: finding::rfc3339(now),
                published: known.as_ref().is_some_and(|k| k.published),
            };
            if act {
                if known.is_none() {
                    report.new += 1;
                    metrics::counter!(
                        "runbridge_audit_findings_total",
                        "kind" => f.kind.as_str(),
                        "workspace" => workspace.to_owned()
                    )
                    .increment(1);
                    tracing::warn!(
                        workspace,
                        kind = %f.kind,
                        promise.id = %f.promise_id,
                        run_id = f.run.run_id,
                        action = f.action.as_str(),
                        reason = %f.reason,
                        "audit finding"
                    );
                }
                self.apply(workspace, &f).await?;
                if !f.published
                    && let Some(sink) = &self.sink
                {
                    let (key, body) = finding::event(&f);
                    match sink.publish(&key, &f.id, &body).await {
                        Ok(()) => f.published = true,
                        Err(e) => {
                            tracing::debug!(error = %e, finding = %f.id, "finding event not published; the next audit tries again")
                        }
                    }
                }
                let record = serde_json::to_string(&f).unwrap_or_default();
                if !self
                    .store
                    .put_finding(workspace, &f.id, &record, self.settings.max_findings)
                    .await?
                {
                    tracing::warn!(
                        workspace,
                        max = self.settings.max_findings,
                        "audit.max_findings reached: a finding is reported but not kept"
                    );
                }
            }
            report.findings.push(f);
        }
        if act {
            self.forget_old(workspace, now).await?;
            for kind in FindingKind::ALL {
                let open = report.findings.iter().filter(|f| f.kind == kind).count();
                metrics::gauge!(
                    "runbridge_audit_open_findings",
                    "kind" => kind.as_str(),
                    "workspace" => workspace.to_owned()
                )
                .set(open as f64);
            }
        }
        Ok(())
    }

    /// What a finding's action does. Repeated at each audit that sees the
    /// finding again (both are idempotent), so a cancel Databricks refused
    /// for a while is asked for again.
    async fn apply(&self, workspace: &str, f: &Finding) -> Result<(), StoreError> {
        let Ok(id) = PromiseId::parse(&f.promise_id) else {
            return Ok(());
        };
        match f.action {
            Action::Report => {}
            Action::Cancel if f.run.is_active() => {
                if let Ok(run) = RunId::new(f.run.run_id) {
                    self.store.schedule_cancel(&id, workspace, run).await?;
                }
            }
            Action::Cancel => {}
            Action::Settle => {
                self.store.check_run_now(&id).await?;
            }
        }
        Ok(())
    }

    async fn forget_old(&self, workspace: &str, now: i64) -> Result<(), StoreError> {
        let cutoff = finding::rfc3339(now - ms(self.settings.keep));
        let old: Vec<String> = self
            .store
            .findings(workspace)
            .await?
            .iter()
            .filter_map(|r| serde_json::from_str::<Finding>(r).ok())
            .filter(|f| f.last_seen < cutoff)
            .map(|f| f.id)
            .collect();
        self.store.drop_findings(workspace, &old).await
    }
}

/// The findings kept for `workspace`, most recently seen first, at most
/// `limit` (the console's page).
pub async fn kept_findings<S: Audits>(
    store: &S,
    workspace: &str,
    limit: usize,
) -> Result<Vec<Finding>, StoreError> {
    let mut all: Vec<Finding> = store
        .findings(workspace)
        .await?
        .iter()
        .filter_map(|r| serde_json::from_str(r).ok())
        .collect();
    all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.id.cmp(&b.id)));
    all.truncate(limit);
    Ok(all)
}

impl<S: PromiseStore + Audits, J: Jobs> Auditor<S, J> {
    /// Audits every workspace in turn, every `audit.interval_ms`, while
    /// this worker holds the workspace's audit lease, until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        workspaces: Vec<String>,
        member: String,
        shutdown: CancellationToken,
    ) {
        let interval = self.settings.interval;
        tracing::info!(interval_ms = interval.as_millis() as u64, "audit running");
        while !shutdown.is_cancelled() {
            for ws in &workspaces {
                match self.store.hold_audit(ws, &member, interval * 3).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(workspace = %ws, error = %e, "audit lease unavailable; next interval");
                        continue;
                    }
                }
                self.audit_in_turn(ws, &member).await;
            }
            pause(interval, &shutdown).await;
        }
        tracing::info!("audit stopped");
    }

    async fn audit_in_turn(&self, ws: &str, member: &str) {
        let began = now_ms();
        let clock = std::time::Instant::now();
        let since = match self.store.last_audit(ws).await {
            Ok(Some(last)) => last - ms(self.settings.overlap),
            Ok(None) => began - ms(self.settings.lookback),
            Err(e) => {
                tracing::warn!(workspace = %ws, error = %e, "audit skipped: the store is unavailable");
                return;
            }
        };
        // The lease is renewed while a long audit (a wide window, a slow
        // workspace) goes on, so no other worker starts the same audit;
        // one that loses it stops.
        let interval = self.settings.interval;
        let renew = async {
            loop {
                tokio::time::sleep(interval).await;
                if let Ok(false) = self.store.hold_audit(ws, member, interval * 3).await {
                    return;
                }
            }
        };
        let outcome = tokio::select! {
            r = Box::pin(self.audit(ws, since, Mode::Act)) => r,
            () = renew => {
                tracing::warn!(workspace = %ws, "audit lease lost mid-audit; another worker audits");
                return;
            }
        };
        match outcome {
            Ok(r) => {
                if let Err(e) = self.store.audit_done(ws, began).await {
                    tracing::warn!(workspace = %ws, error = %e, "audit's end not recorded; the next one lists from further back");
                }
                metrics::counter!("runbridge_audit_runs_total", "workspace" => ws.to_owned())
                    .increment(1);
                metrics::counter!("runbridge_audit_databricks_calls_total", "workspace" => ws.to_owned())
                    .increment(r.calls as u64);
                if r.truncated {
                    tracing::warn!(workspace = %ws, max_pages = self.settings.max_pages, "audit listing stopped at audit.max_pages; older runs of the window were not read");
                }
                tracing::debug!(workspace = %ws, runs = r.runs_seen, calls = r.calls, findings = r.findings.len(), new = r.new, took_ms = clock.elapsed().as_millis() as u64, "audit done");
            }
            Err(e) => {
                tracing::warn!(workspace = %ws, error = %e, took_ms = clock.elapsed().as_millis() as u64, "audit failed; trying again next interval")
            }
        }
    }
}

/// A window as `runbridge audit --since` takes it: a number and a unit
/// (`s`, `m`, `h`, `d`), at most 60 days (as long as Databricks keeps runs).
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("--since must be a number and a unit (30m, 24h, 7d), got {text:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "--since takes the units s, m, h or d (30m, 24h, 7d), got {text:?}"
            ));
        }
    };
    if secs == 0 || secs > 60 * 86_400 {
        return Err(format!(
            "--since must be between 1s and 60d (Databricks keeps runs 60 days), got {text:?}"
        ));
    }
    Ok(Duration::from_secs(secs))
}

/// The findings as a table for people, one line each, after a summary of
/// what was read.
pub fn render(reports: &[AuditReport]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "workspace {}: {} runs read since {} ({} Databricks calls{}), {} finding(s)",
            r.workspace,
            r.runs_seen,
            finding::rfc3339(r.since),
            r.calls,
            if r.truncated {
                ", listing cut at audit.max_pages"
            } else {
                ""
            },
            r.findings.len()
        );
    }
    let rows: Vec<[String; 7]> = reports
        .iter()
        .flat_map(|r| &r.findings)
        .map(|f| {
            [
                f.kind.to_string(),
                f.promise_id.clone(),
                f.promise
                    .as_ref()
                    .map_or("(none)".into(), |p| p.state.clone()),
                f.run.run_id.to_string(),
                match &f.run.result {
                    Some(r) => format!("{} {r}", f.run.state),
                    None => f.run.state.clone(),
                },
                f.action.as_str().to_owned(),
                f.reason.clone(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return out;
    }
    let head = [
        "KIND",
        "PROMISE",
        "PROMISE STATE",
        "RUN",
        "RUN STATE",
        "ACTION",
        "REASON",
    ];
    let mut width = head.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row).take(6) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i < 6 {
                let _ = write!(l, "{c:<w$}  ", w = width[i]);
            } else {
                l.push_str(c);
            }
        }
        l
    };
    let _ = writeln!(out, "{}", line(head));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_a_number_and_a_unit_within_sixty_days() {
        assert_eq!(parse_window("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_window("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(parse_window("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "h", "24", "24w", "0h", "61d", "-1h", "1.5h"] {
            assert!(parse_window(bad).is_err(), "{bad:?}");
        }
    }
}
