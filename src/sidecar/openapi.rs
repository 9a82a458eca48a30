//! The sidecar's OpenAPI 3.1 document, served at `/openapi.json` and kept in
//! `docs/openapi.json`. It is assembled by utoipa from the `#[utoipa::path]`
//! attributes on the handlers and from the types the handlers serialise and
//! parse, so a field added to a response shows up here by itself; a test
//! sends real requests and checks every answer against this document.

use std::sync::OnceLock;

use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::domain::promise::PromiseView;
use crate::domain::{Payload, SettledBy, State};
use crate::reconciler::CancelReport;

use super::error::{ErrorBody, ErrorDetail};
use super::progress;
use super::{__path_adopt, __path_bulk_cancel, __path_create, PromiseAnswer};
use super::{__path_get_promise, __path_healthz, __path_heartbeat, __path_metrics};
use super::{__path_notification, __path_openapi_json, __path_patch, __path_readyz};
use super::{__path_reject, __path_resolve, __path_search};
use super::{CallbackBody, CancelBody, CreateBody, Notification, NotificationRun, PatchBody};

/// The answers of every route that settles a promise (the notebook's
/// resolve/reject, PATCH): one list for all of them.
#[derive(IntoResponses)]
#[allow(dead_code)] // describes the answers; handlers build them as ApiResult
pub(super) enum SettleAnswers {
    #[response(
        status = 200,
        description = "Settled, or a repeat of the same settlement (`deduplicated`)"
    )]
    Settled(PromiseAnswer),
    #[response(
        status = 202,
        description = "A notebook's reject without `final`, retried by the promise's policy: still PENDING, its next attempt scheduled"
    )]
    Retrying(PromiseAnswer),
    #[response(status = 400, description = "Malformed request")]
    BadRequest(ErrorBody),
    #[response(status = 401, description = "Missing or invalid token")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "Already settled otherwise")]
    AlreadySettled(ErrorBody),
    #[response(status = 404, description = "No such promise")]
    NotFound(ErrorBody),
    #[response(status = 413, description = "Body over the limit")]
    TooLarge(ErrorBody),
    #[response(status = 415, description = "Body is not JSON")]
    UnsupportedMediaType(ErrorBody),
    #[response(status = 503, description = "Store unavailable; retry")]
    Unavailable(ErrorBody),
}

/// `GET /promises`.
#[derive(Serialize, ToSchema)]
pub struct SearchPage {
    /// Never null; empty when nothing matches.
    pub promises: Vec<PromiseView>,
    /// Pass as `cursor` for the next page; null on the last.
    pub cursor: Option<String>,
}

/// `POST /databricks/notifications`.
#[derive(Serialize, ToSchema)]
pub struct NotificationAnswer {
    /// Whether a pending promise runs this run (and will be checked).
    pub scheduled: bool,
    pub promise_id: Option<String>,
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// `ok` or `unreachable`.
    pub redis: &'static str,
    /// `ok` or `unreachable`.
    pub broker: &'static str,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "runbridge sidecar",
        description = "Notebook callbacks (capability routes under {url} = {public_url}/cb/{token}), the Durable Promise API (resonatehq/durable-promise-specification), Databricks job notifications and health. Every response body is JSON, errors included: {\"error\": {\"code\", \"message\"}}.",
        license(name = "Apache-2.0")
    ),
    paths(
        resolve, reject, heartbeat, progress::progress,
        get_promise, patch, create, search, bulk_cancel, adopt, progress::retry_now,
        notification, healthz, readyz, metrics, openapi_json
    ),
    components(schemas(
        PromiseView, PromiseAnswer, Payload, State, SettledBy, ErrorBody, ErrorDetail,
        CallbackBody, PatchBody, CreateBody, CancelBody, CancelReport, SearchPage,
        Notification, NotificationRun, NotificationAnswer, Health, Readiness,
        crate::domain::progress::ProgressMessage, progress::RetryBody, progress::ProgressAnswer
    )),
    modifiers(&Security, &CapabilityRoutes),
    tags(
        (name = "callbacks", description = "What a notebook calls: the capability token opens only its own promise"),
        (name = "promises", description = "The Durable Promise API"),
        (name = "databricks", description = "Databricks job notification destinations"),
        (name = "operations", description = "Health, readiness, metrics, this document")
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.description = Some(
            "An operator token (auth.operator_tokens), or on a promise's own routes its capability token".into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(bearer));
        let mut basic = Http::new(HttpAuthScheme::Basic);
        basic.description = Some(
            "Any user name and the capability token as the password (Resonate SDK clients); for notifications, auth.notification_username/password".into(),
        );
        components.add_security_scheme("basic", SecurityScheme::Http(basic));
    }
}

/// The routes a notebook calls under its `url` (`/cb/{token}`): the same
/// handlers as these token-less paths, so each is documented once (on the
/// handler) and its capability form derived here: a `token` path parameter
/// first, no credential header, and its own operation id.
const CAPABILITY_ROUTES: [&str; 5] = [
    "/resolve",
    "/reject",
    "/heartbeat",
    "/progress",
    "/promises/{id}",
];

struct CapabilityRoutes;

impl Modify for CapabilityRoutes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::security::SecurityRequirement;
        use utoipa::openapi::{ObjectBuilder, Required, Type};
        for path in CAPABILITY_ROUTES {
            let Some(mut item) = openapi.paths.paths.get(path).cloned() else {
                continue;
            };
            for op in [&mut item.get, &mut item.post, &mut item.patch]
                .into_iter()
                .flatten()
            {
                let token = ParameterBuilder::new()
                    .name("token")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .description(Some(
                        "The capability token (the `url` parameter's last segment)",
                    ))
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .build();
                op.parameters.get_or_insert_with(Vec::new).insert(0, token);
                op.security = Some(vec![SecurityRequirement::default()]);
                op.operation_id = op.operation_id.take().map(|id| format!("cb_{id}"));
            }
            openapi
                .paths
                .paths
                .insert(format!("/cb/{{token}}{path}"), item);
        }
    }
}

/// The document as pretty JSON (built once).
pub fn document() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().unwrap_or_default())
        .clone()
}
