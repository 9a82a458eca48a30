//! Every error the sidecar answers is JSON, shaped as Resonate's server
//! shapes its errors so Resonate's SDKs read them (`resonate-sdk` 0.6 reads
//! `error.code` as a number): `{"error": {"code", "status", "reason",
//! "message"}}`, `code` the HTTP status, `status` Resonate's status code,
//! and `reason` runbridge's machine-readable reason (docs/contracts.md, the
//! HTTP API).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::promise::PromiseView;
use crate::domain::{Promise, State};
use crate::store::StoreError;

/// Every error body (the OpenAPI document's `Error`).
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status, as a number (Resonate's server's `code`).
    pub code: u16,
    /// Resonate's status code, as a string: the HTTP status times ten, and
    /// for a settled promise its state (4030 resolved, 4031 rejected, 4032
    /// canceled, 4033 timed out).
    pub status: String,
    /// A stable, machine-readable reason, e.g. `already_settled`.
    pub reason: String,
    /// A sentence for people.
    pub message: String,
    /// With 403 `already_settled` and 409 `already_exists`: the promise's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// With 403 `already_settled` and 409 `already_exists`: the promise as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promise: Option<PromiseView>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// The machine-readable reason (`reason` in the body).
    pub reason: &'static str,
    pub message: String,
    /// The promise the request ran into (403, 409).
    pub promise: Option<Box<PromiseView>>,
}

impl ApiError {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            promise: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid token for this promise",
        )
    }

    pub fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no promise {id:?}"),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is over the limit of {limit} bytes"),
        )
    }

    /// 403: a different completion of an already settled promise.
    pub fn already_settled(p: &Promise) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason: "already_settled",
            message: format!("promise {} is already {}", p.id, p.state),
            promise: Some(Box::new(p.view())),
        }
    }
}

impl From<crate::domain::tags::TagError> for ApiError {
    fn from(e: crate::domain::tags::TagError) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl From<crate::domain::ids::IdError> for ApiError {
    fn from(e: crate::domain::ids::IdError) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidCursor => {
                Self::bad_request("invalid cursor: pass the cursor of the previous page unchanged")
            }
            // Not retryable, and the caller cannot fix it: say so without
            // the record's details (logged where the record was read).
            StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "store error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "unreadable_record",
                    "the stored record of this promise cannot be read; an operator must repair or delete it",
                )
            }
            // Logged here, where it is handled; the caller gets a retryable 503.
            _ => {
                tracing::error!(error = %e, "store error");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the promise store is unavailable; retry",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let promise = self.promise.map(|p| *p);
        let code = self.status.as_u16();
        let status = match promise.as_ref().map(|p| p.state) {
            Some(State::Resolved) if code == 403 => 4030,
            Some(State::Rejected) if code == 403 => 4031,
            Some(State::RejectedCanceled) if code == 403 => 4032,
            Some(State::RejectedTimedout) if code == 403 => 4033,
            _ => u32::from(code) * 10,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                status: status.to_string(),
                reason: self.reason.to_owned(),
                message: self.message,
                state: promise.as_ref().map(|p| p.state),
                promise,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
