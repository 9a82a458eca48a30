//! [`Jobs`] over HTTP with reqwest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::{StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::ratelimit::TokenBucket;
use super::{ApiErrorBody, CallClass, DatabricksError, ErrorClass, RateBudget, classify};

/// One workspace: where it is and how to authenticate.
#[derive(Clone)]
pub struct WorkspaceSettings {
    pub host: url::Url,
    pub credentials: Credentials,
}

/// A personal access token, or a service principal for OAuth
/// machine-to-machine (client-credentials grant at `{host}/oidc/v1/token`).
#[derive(Clone)]
pub enum Credentials {
    Token(SecretString),
    OAuth {
        client_id: String,
        client_secret: SecretString,
    },
}

impl std::fmt::Debug for WorkspaceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match &self.credentials {
            Credentials::Token(_) => "token [REDACTED]".to_string(),
            Credentials::OAuth { client_id, .. } => {
                format!("oauth client {client_id} secret [REDACTED]")
            }
        };
        f.debug_struct("WorkspaceSettings")
            .field("host", &self.host.as_str())
            .field("auth", &auth)
            .finish()
    }
}

/// An OAuth access token and when to stop using it.
struct CachedToken {
    token: SecretString,
    refresh_at: tokio::time::Instant,
}

#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub workspaces: HashMap<String, WorkspaceSettings>,
    pub request_timeout: Duration,
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
    pub retry_max_times: usize,
    /// Requests per second per workspace, by class (0 = unlimited).
    pub launch_per_second: f64,
    pub poll_per_second: f64,
    pub cancel_per_second: f64,
    pub burst: u32,
}

impl ClientSettings {
    fn rate(&self, class: CallClass) -> f64 {
        match class {
            CallClass::Launch => self.launch_per_second,
            CallClass::Poll => self.poll_per_second,
            CallClass::Cancel => self.cancel_per_second,
        }
    }
}

struct Workspace {
    host: url::Url,
    credentials: Credentials,
    /// OAuth only: the current access token (one refresh at a time).
    oauth: tokio::sync::Mutex<Option<CachedToken>>,
    /// Per call class: its own bucket and 429 pause. Databricks limits
    /// requests per endpoint, so a 429 on `runs/get` holds the polls and
    /// not the launches.
    classes: HashMap<CallClass, ClassLimits>,
    /// Every call waits after a refusal of the credentials (all classes
    /// fail alike then).
    credentials_paused_until: std::sync::Mutex<tokio::time::Instant>,
    /// The workspace refuses its credentials right now (logged once per
    /// outage, shown as `runbridge_databricks_credentials_valid`).
    credentials_refused: std::sync::atomic::AtomicBool,
}

/// One call class of a workspace: its rate and its pause.
struct ClassLimits {
    /// Used when no shared budget is configured, or it cannot be reached.
    bucket: TokenBucket,
    /// Local pause after a 429 (the shared one lives in the budget).
    paused_until: std::sync::Mutex<tokio::time::Instant>,
    /// An unlimited class only looks for another worker's pause this often.
    pause_seen_clear_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How long every call to a workspace waits after it refused the
/// credentials: an expired token fails every call alike, so a burst of
/// triggers must not become a burst of refusals.
const CREDENTIALS_PAUSE: Duration = Duration::from_secs(2);

/// With no rate limit, the shared budget is consulted only for another
/// worker's 429 pause, and a "no pause" answer holds for this long: one Redis
/// round trip per call would cost more than the call's own bookkeeping (make
/// bench, B1), and a worker that misses a fresh pause for this long gets its
/// own 429 and pauses anyway.
const UNLIMITED_PAUSE_CHECK: Duration = Duration::from_millis(100);

/// One Jobs API request, as each attempt sends it.
struct Call<'a> {
    method: reqwest::Method,
    endpoint: &'static str,
    class: CallClass,
    body: &'a Value,
    /// W3C trace context to pass on (launches).
    traceparent: Option<&'a str>,
}

const CLASSES: [CallClass; 3] = [CallClass::Launch, CallClass::Poll, CallClass::Cancel];

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    workspaces: Arc<HashMap<String, Workspace>>,
    backoff: ExponentialBuilder,
    settings: Arc<ClientSettings>,
    budget: Option<Arc<dyn RateBudget>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.workspaces.keys().collect();
        names.sort();
        f.debug_struct("Client")
            .field("workspaces", &names)
            .finish()
    }
}

/// One attempt's failure, as backon sees it.
#[derive(Debug)]
enum Attempt {
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        /// A refused OAuth token (retried once with a fresh one): reported
        /// as a credentials failure if the retries do not help.
        refused: Option<(u16, ApiErrorBody)>,
    },
    Stop(DatabricksError),
}

fn retry(reason: String) -> Attempt {
    Attempt::Retry {
        reason,
        retry_after: None,
        refused: None,
    }
}

fn retry_after(h: &header::HeaderMap) -> Option<Duration> {
    let v = h.get(header::RETRY_AFTER)?.to_str().ok()?;
    // Seconds form only; an HTTP-date falls back to the backoff schedule.
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(300)))
}

impl Client {
    /// `budget`: the request budget shared with other workers; `None` limits
    /// this process alone.
    pub fn new(
        s: &ClientSettings,
        budget: Option<Arc<dyn RateBudget>>,
    ) -> Result<Self, DatabricksError> {
        let http = reqwest::Client::builder()
            .timeout(s.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("runbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DatabricksError::Protocol {
                endpoint: "client",
                reason: e.to_string(),
            })?;
        let workspaces =
            s.workspaces
                .iter()
                .map(|(name, w)| {
                    (
                        name.clone(),
                        Workspace {
                            host: w.host.clone(),
                            credentials: w.credentials.clone(),
                            oauth: tokio::sync::Mutex::new(None),
                            classes: CLASSES
                                .iter()
                                .map(|c| {
                                    (
                                        *c,
                                        ClassLimits {
                                            bucket: TokenBucket::new(s.rate(*c), s.burst),
                                            paused_until: std::sync::Mutex::new(
                                                tokio::time::Instant::now(),
                                            ),
                                            pause_seen_clear_at: std::sync::Mutex::new(None),
                                        },
                                    )
                                })
                                .collect(),
                            credentials_paused_until: std::sync::Mutex::new(
                                tokio::time::Instant::now(),
                            ),
                            credentials_refused: std::sync::atomic::AtomicBool::new(false),
                        },
                    )
                })
                .collect();
        for name in s.workspaces.keys() {
            metrics::gauge!("runbridge_databricks_credentials_valid", "workspace" => name.clone())
                .set(1.0);
        }
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(s.retry_min_delay)
            .with_max_delay(s.retry_max_delay)
            .with_max_times(s.retry_max_times);
        Ok(Self {
            http,
            workspaces: Arc::new(workspaces),
            backoff,
            settings: Arc::new(s.clone()),
            budget,
        })
    }

    fn workspace(&self, name: &str) -> Result<&Workspace, DatabricksError> {
        self.workspaces
            .get(name)
            .ok_or_else(|| DatabricksError::UnknownWorkspace(name.to_owned()))
    }

    /// Waits for the class's budget: the shared one when configured and
    /// reachable, else this process's own bucket; and any pause of the class
    /// after a 429 or of the workspace after refused credentials.
    async fn acquire(&self, name: &str, ws: &Workspace, class: CallClass) {
        let Some(limits) = ws.classes.get(&class) else {
            return;
        };
        let now = tokio::time::Instant::now();
        let until = |m: &std::sync::Mutex<tokio::time::Instant>| m.lock().map_or(now, |t| *t);
        let local_pause = until(&limits.paused_until).max(until(&ws.credentials_paused_until));
        tokio::time::sleep_until(local_pause).await;
        let rate = self.settings.rate(class);
        // Even with no rate limit the shared pause after a 429 applies.
        if let Some(b) = &self.budget {
            let unlimited = rate <= 0.0;
            if unlimited
                && limits
                    .pause_seen_clear_at
                    .lock()
                    .ok()
                    .and_then(|t| *t)
                    .is_some_and(|t| t.elapsed() < UNLIMITED_PAUSE_CHECK)
            {
                return;
            }
            loop {
                match b.try_acquire(name, class, rate, self.settings.burst).await {
                    Ok(d) if d.is_zero() => {
                        if unlimited && let Ok(mut t) = limits.pause_seen_clear_at.lock() {
                            *t = Some(tokio::time::Instant::now());
                        }
                        return;
                    }
                    Ok(d) => tokio::time::sleep(d.min(Duration::from_secs(5))).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "shared request budget unavailable; limiting this process alone");
                        break;
                    }
                }
            }
        }
        if rate > 0.0 {
            limits.bucket.acquire().await;
        }
    }

    /// A 429: hold the class that was refused (on every worker) for `d`.
    async fn pause(&self, name: &str, ws: &Workspace, class: CallClass, d: Duration) {
        if let Some(Ok(mut t)) = ws.classes.get(&class).map(|l| l.paused_until.lock()) {
            *t = (*t).max(tokio::time::Instant::now() + d);
        }
        if let Some(b) = &self.budget
            && let Err(e) = b.pause(name, class, d).await
        {
            tracing::warn!(error = %e, "could not share the 429 pause with other workers");
        }
    }

    /// The bearer token for a request: the PAT, or a cached OAuth access
    /// token, fetched with the client-credentials grant when there is none or
    /// it is near its expiry (refreshed a fifth of its lifetime, at most a
    /// minute, early).
    async fn bearer(&self, ws: &Workspace) -> Result<SecretString, Attempt> {
        let (client_id, client_secret) = match &ws.credentials {
            Credentials::Token(t) => return Ok(t.clone()),
            Credentials::OAuth {
                client_id,
                client_secret,
            } => (client_id, client_secret),
        };
        let mut cache = ws.oauth.lock().await;
        if let Some(c) = cache.as_ref()
            && tokio::time::Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let endpoint = "oidc/v1/token";
        let retry = |reason: String| retry(format!("oauth token: {reason}"));
        let url = ws.host.join(endpoint).map_err(|e| retry(e.to_string()))?;
        let resp = self
            .http
            .post(url)
            .basic_auth(client_id, Some(client_secret.expose_secret()))
            .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
            .send()
            .await
            .map_err(|e| retry(e.to_string()))?;
        let status = resp.status();
        metrics::counter!("runbridge_databricks_oauth_token_requests_total", "status" => status.as_u16().to_string())
            .increment(1);
        if !status.is_success() {
            // A wrong client secret is the operator's to fix: retried like a
            // 401 on an API call (the trigger is kept), and logged there.
            return Err(retry(format!("HTTP {}", status.as_u16())));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: u64,
        }
        let t: TokenResponse = resp.json().await.map_err(|e| retry(e.to_string()))?;
        let life = Duration::from_secs(t.expires_in);
        let early = (life / 5).min(Duration::from_secs(60));
        let token = SecretString::from(t.access_token);
        *cache = Some(CachedToken {
            token: token.clone(),
            refresh_at: tokio::time::Instant::now() + life - early,
        });
        Ok(token)
    }

    async fn attempt(&self, name: &str, ws: &Workspace, call: Call<'_>) -> Result<Value, Attempt> {
        let Call {
            method,
            endpoint,
            class,
            body,
            traceparent,
        } = call;
        self.acquire(name, ws, class).await;
        let url = ws.host.join(endpoint).map_err(|e| {
            Attempt::Stop(DatabricksError::Protocol {
                endpoint,
                reason: e.to_string(),
            })
        })?;
        let req = self
            .http
            .request(method.clone(), url)
            .bearer_auth(self.bearer(ws).await?.expose_secret());
        let req = match traceparent {
            Some(tp) => req.header("traceparent", tp),
            None => req,
        };
        let req = if method == reqwest::Method::GET {
            req.query(&body.as_object().map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.to_string().trim_matches('"').to_owned()))
                    .collect::<Vec<_>>()
            }))
        } else {
            req.json(body)
        };
        let started = std::time::Instant::now();
        let sent = req.send().await;
        let status_label = match &sent {
            Ok(r) => r.status().as_u16().to_string(),
            Err(e) if e.is_timeout() => "timeout".into(),
            Err(e) if e.is_builder() => "invalid_request".into(),
            Err(_) => "connection_error".into(),
        };
        metrics::counter!("runbridge_databricks_requests_total", "endpoint" => endpoint, "status" => status_label)
            .increment(1);
        metrics::histogram!("runbridge_databricks_request_duration_seconds", "endpoint" => endpoint)
            .record(started.elapsed().as_secs_f64());
        let resp = sent.map_err(|e| {
            if e.is_builder() {
                // Nothing was sent: the request itself cannot be built (a
                // header value that is not one), and it fails the same way
                // every time, so it is not tried again in place.
                return Attempt::Stop(DatabricksError::Protocol {
                    endpoint,
                    reason: format!("the request could not be built: {e}"),
                });
            }
            retry(if e.is_timeout() {
                "timeout".into()
            } else {
                format!("connection: {e}")
            })
        })?;
        let status = resp.status();
        let after = retry_after(resp.headers());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| retry(format!("reading body: {e}")))?;
        if status.is_success() {
            self.credentials_accepted(name, ws);
            // An empty 2xx body is a valid answer (`runs/cancel` sends `{}`,
            // some gateways nothing at all).
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Object(Default::default()));
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                Attempt::Stop(DatabricksError::Protocol {
                    endpoint,
                    reason: format!("body: {e}"),
                })
            });
        }
        let code = status.as_u16();
        let body = ApiErrorBody::from_answer(code, &bytes);
        let reason = format!("HTTP {code} {}: {}", body.error_code, body.message);
        match classify(code, &body) {
            ErrorClass::Credentials => {
                if matches!(ws.credentials, Credentials::OAuth { .. }) {
                    // An OAuth token may have been revoked or expired early:
                    // the retry gets a fresh one, and only a refusal that
                    // outlives the retries counts as an outage (`call`).
                    *ws.oauth.lock().await = None;
                    return Err(Attempt::Retry {
                        reason,
                        retry_after: None,
                        refused: Some((code, body)),
                    });
                }
                self.credentials_refused(name, ws, endpoint, code, &body);
                Err(Attempt::Stop(DatabricksError::Credentials {
                    workspace: name.to_owned(),
                    endpoint,
                    status: code,
                    body,
                }))
            }
            ErrorClass::Transient => {
                if status == StatusCode::TOO_MANY_REQUESTS {
                    let d = after.unwrap_or(Duration::from_secs(1));
                    self.pause(name, ws, class, d).await;
                }
                Err(Attempt::Retry {
                    reason,
                    retry_after: after,
                    refused: None,
                })
            }
            // The quota frees over minutes: the caller tries again later
            // (a trigger is held and retried in place), not this call.
            ErrorClass::Quota => Err(Attempt::Stop(DatabricksError::Transient {
                endpoint,
                reason,
            })),
            ErrorClass::Permanent => Err(Attempt::Stop(DatabricksError::Permanent {
                endpoint,
                status: code,
                body,
            })),
        }
    }

    /// A refusal of the credentials: every call to the workspace waits a
    /// moment; the first refusal of an outage is logged (with the reason
    /// Databricks gave), later ones are not.
    fn credentials_refused(
        &self,
        name: &str,
        ws: &Workspace,
        endpoint: &str,
        status: u16,
        body: &ApiErrorBody,
    ) {
        use std::sync::atomic::Ordering;
        metrics::gauge!("runbridge_databricks_credentials_valid", "workspace" => name.to_owned())
            .set(0.0);
        if !ws.credentials_refused.swap(true, Ordering::SeqCst) {
            tracing::error!(
                workspace = name,
                endpoint,
                status,
                error_code = %body.error_code,
                message = %body.message,
                "databricks refuses this workspace's credentials (expired or revoked token?): its triggers are held, none is rejected, until they are accepted again; set a valid token or OAuth secret under databricks.workspaces.{name}"
            );
        }
        if let Ok(mut until) = ws.credentials_paused_until.lock() {
            *until = (*until).max(tokio::time::Instant::now() + CREDENTIALS_PAUSE);
        }
    }

    fn credentials_accepted(&self, name: &str, ws: &Workspace) {
        use std::sync::atomic::Ordering;
        // A load first: the swap (a write) only during an outage.
        if ws.credentials_refused.load(Ordering::Relaxed)
            && ws.credentials_refused.swap(false, Ordering::SeqCst)
        {
            metrics::gauge!("runbridge_databricks_credentials_valid", "workspace" => name.to_owned())
                .set(1.0);
            tracing::info!(
                workspace = name,
                "databricks accepts this workspace's credentials again"
            );
        }
    }

    /// One Jobs API call with the retries, budgets, pauses and
    /// credentials handling above; the endpoints (`endpoints.rs`) are built
    /// on it.
    pub(super) async fn call(
        &self,
        workspace: &str,
        method: reqwest::Method,
        endpoint: &'static str,
        class: CallClass,
        body: Value,
        traceparent: Option<&str>,
    ) -> Result<Value, DatabricksError> {
        let ws = self.workspace(workspace)?;
        (|| {
            self.attempt(
                workspace,
                ws,
                Call {
                    method: method.clone(),
                    endpoint,
                    class,
                    body: &body,
                    traceparent,
                },
            )
        })
            .retry(self.backoff)
            .when(|e| matches!(e, Attempt::Retry { .. }))
            .adjust(|e, planned| match e {
                Attempt::Retry { retry_after: Some(ra), .. } => planned.map(|d| d.max(*ra)),
                _ => planned,
            })
            .notify(|e, wait| {
                if let Attempt::Retry { reason, .. } = e {
                    tracing::warn!(endpoint, %reason, wait_ms = wait.as_millis() as u64, "databricks call failed; retrying");
                }
            })
            .await
            .map_err(|e| match e {
                Attempt::Retry {
                    refused: Some((status, body)),
                    ..
                } => {
                    self.credentials_refused(workspace, ws, endpoint, status, &body);
                    DatabricksError::Credentials {
                        workspace: workspace.to_owned(),
                        endpoint,
                        status,
                        body,
                    }
                }
                Attempt::Retry { reason, .. } => DatabricksError::Transient { endpoint, reason },
                Attempt::Stop(e) => e,
            })
    }
}
