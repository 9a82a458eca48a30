//! The emulator's HTTP surface: the Jobs API routes (on the 2.1 and 2.2
//! paths), the workspace's identity routes, and `/emulator/*` for tests.
//!
//! Only the router lives here, above the handlers: `jobs`, `launch`,
//! `runs`, `repair` and `control` handle requests with what `request`,
//! `gate` and `view` share below them.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::json;

use super::model::Emulator;
use super::request::err;
use super::{control, jobs, launch, repair, runs};

pub fn router(emu: Arc<Emulator>) -> Router {
    Router::new()
        .route("/api/{version}/jobs/create", post(jobs::create_job))
        .route("/api/{version}/jobs/get", get(jobs::get_job))
        .route("/api/{version}/jobs/list", get(jobs::list_jobs))
        .route("/api/{version}/jobs/update", post(jobs::update_job))
        .route("/api/{version}/jobs/reset", post(jobs::reset_job))
        .route("/api/{version}/jobs/delete", post(jobs::delete_job))
        .route("/api/{version}/jobs/run-now", post(launch::run_now))
        .route("/api/{version}/jobs/runs/submit", post(launch::submit))
        .route("/api/{version}/jobs/runs/get", get(runs::get_run))
        .route("/api/{version}/jobs/runs/get-output", get(runs::get_output))
        .route("/api/{version}/jobs/runs/cancel", post(runs::cancel))
        .route(
            "/api/{version}/jobs/runs/cancel-all",
            post(runs::cancel_all),
        )
        .route("/api/{version}/jobs/runs/delete", post(runs::delete_run))
        .route("/api/{version}/jobs/runs/repair", post(repair::repair))
        .route("/api/{version}/jobs/runs/list", get(runs::list_runs))
        .route("/api/2.0/preview/scim/v2/Me", get(control::me))
        .route("/oidc/v1/token", post(control::oauth_token))
        .route("/emulator/tokens", post(control::set_token))
        .route(
            "/emulator/faults",
            get(control::get_faults).post(control::set_faults),
        )
        .route("/emulator/inject", post(control::inject))
        .route("/emulator/notifications", post(control::set_notify))
        .route("/emulator/runs", get(control::all_runs))
        .route("/emulator/stats", get(control::stats))
        .route("/emulator/calls", get(control::call_log))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async {
            err(
                StatusCode::NOT_FOUND,
                "ENDPOINT_NOT_FOUND",
                "No API found for this path",
            )
        })
        .with_state(emu)
}
