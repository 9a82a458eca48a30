//! Health, readiness, metrics and the OpenAPI document.

use super::*;

/// Prometheus text format (version 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String))
)]
pub(super) async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics::render(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The process is up", body = Health))
)]
pub(super) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "This document", content_type = "application/json"))
)]
pub(super) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Redis and the broker are reachable, and the broker has the events exchange (a worker declares it)", body = Readiness),
        (status = 503, description = "One of them is not", body = Readiness)
    )
)]
pub(super) async fn readyz<S: Store>(st: St<S>) -> Response {
    let redis = st.store.ping().await.is_ok();
    let broker = st.broker_ready.load(Ordering::Relaxed);
    let status = if redis && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let body = Readiness {
        status: if redis && broker {
            "ready"
        } else {
            "not_ready"
        },
        redis: word(redis),
        broker: word(broker),
    };
    (status, Json(body)).into_response()
}
