//! The Jobs API endpoints the bridge uses, on [`Client::call`]: `run-now`,
//! `runs/submit`, `runs/get` and `jobs/get` (every page), `runs/get-output`,
//! `runs/list` (a page at a time), `runs/cancel`, `runs/repair`, and SCIM `Me` for `runbridge check`.

use serde_json::{Value, json};

use super::client::Client;
use super::{
    CallClass, DatabricksError, JobInfo, Jobs, LaunchRequest, RunInfo, RunsPage, RunsQuery,
};
use crate::domain::{IdempotencyToken, RunId};

fn run_id_of(endpoint: &'static str, v: &Value) -> Result<RunId, DatabricksError> {
    v.get("run_id")
        .and_then(Value::as_u64)
        .and_then(|n| RunId::new(n).ok())
        .ok_or(DatabricksError::Protocol {
            endpoint,
            reason: "no positive run_id in the response".into(),
        })
}

/// Pages followed at the most (100 tasks each): a run or job larger than
/// that is not one the bridge launched, and a loop must end.
const MAX_PAGES: usize = 1000;

fn too_many_pages(endpoint: &'static str) -> DatabricksError {
    DatabricksError::Protocol {
        endpoint,
        reason: format!("more than {MAX_PAGES} pages"),
    }
}

/// A Jobs API 2.2 read that pages its `tasks` (100 at a time): later pages
/// carry only the rest, and the last no `next_page_token`.
trait Paged: serde::de::DeserializeOwned {
    fn take_page_token(&mut self) -> Option<String>;
    /// Adds a later page's items to this (the first) page.
    fn extend(&mut self, page: Self);
}

/// A run-now's parameters (job or notebook parameters, as the launch has
/// them) on a request body; a one-time run's are in its tasks.
fn with_parameters(body: &mut Value, launch: &LaunchRequest) {
    if let LaunchRequest::RunNow {
        job_parameters,
        notebook_params,
        ..
    } = launch
    {
        if let Some(p) = job_parameters {
            body["job_parameters"] = json!(p);
        }
        if let Some(p) = notebook_params {
            body["notebook_params"] = json!(p);
        }
    }
}

impl Paged for RunInfo {
    fn take_page_token(&mut self) -> Option<String> {
        self.next_page_token.take().filter(|t| !t.is_empty())
    }
    fn extend(&mut self, page: Self) {
        self.tasks.extend(page.tasks);
        self.next_page_token = page.next_page_token;
    }
}

impl Paged for JobInfo {
    fn take_page_token(&mut self) -> Option<String> {
        self.next_page_token.take().filter(|t| !t.is_empty())
    }
    fn extend(&mut self, page: Self) {
        self.settings.tasks.extend(page.settings.tasks);
        self.settings.parameters.extend(page.settings.parameters);
        self.next_page_token = page.next_page_token;
    }
}

impl Client {
    /// A paged read, every page followed (at most [`MAX_PAGES`]): the first
    /// page with the others' items added, and no page token left.
    async fn get_all_pages<T: Paged>(
        &self,
        workspace: &str,
        endpoint: &'static str,
        query: Value,
    ) -> Result<T, DatabricksError> {
        let mut all: T = self.get_page(workspace, endpoint, query.clone()).await?;
        let mut pages = 1;
        while let Some(token) = all.take_page_token() {
            let mut q = query.clone();
            q["page_token"] = Value::String(token);
            let page: T = self.get_page(workspace, endpoint, q).await?;
            all.extend(page);
            pages += 1;
            if pages > MAX_PAGES {
                return Err(too_many_pages(endpoint));
            }
        }
        Ok(all)
    }

    /// One GET of a paged read, parsed.
    async fn get_page<T: serde::de::DeserializeOwned>(
        &self,
        workspace: &str,
        endpoint: &'static str,
        query: Value,
    ) -> Result<T, DatabricksError> {
        let v = self
            .call(
                workspace,
                reqwest::Method::GET,
                endpoint,
                CallClass::Poll,
                query,
                None,
            )
            .await?;
        serde_json::from_value(v).map_err(|e| DatabricksError::Protocol {
            endpoint,
            reason: e.to_string(),
        })
    }

    /// Who the workspace's credentials authenticate as (SCIM `Me`): one
    /// cheap authenticated call, for `runbridge check`.
    pub async fn whoami(&self, workspace: &str) -> Result<String, DatabricksError> {
        let v = self
            .call(
                workspace,
                reqwest::Method::GET,
                "api/2.0/preview/scim/v2/Me",
                CallClass::Poll,
                json!({}),
                None,
            )
            .await?;
        Ok(v.get("userName")
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)")
            .to_owned())
    }
}

impl Jobs for Client {
    async fn launch(
        &self,
        workspace: &str,
        req: &LaunchRequest,
        token: &IdempotencyToken,
        traceparent: Option<&str>,
    ) -> Result<RunId, DatabricksError> {
        let (endpoint, body) = match req {
            LaunchRequest::RunNow { job_id, .. } => {
                let mut b = json!({ "job_id": job_id, "idempotency_token": token.as_str() });
                with_parameters(&mut b, req);
                ("api/2.2/jobs/run-now", b)
            }
            LaunchRequest::Submit(body) => {
                let mut b = Value::Object(body.clone());
                b["idempotency_token"] = json!(token.as_str());
                ("api/2.2/jobs/runs/submit", b)
            }
        };
        let v = self
            .call(
                workspace,
                reqwest::Method::POST,
                endpoint,
                CallClass::Launch,
                body,
                traceparent,
            )
            .await?;
        run_id_of(endpoint, &v)
    }

    async fn get_run(&self, workspace: &str, run: RunId) -> Result<RunInfo, DatabricksError> {
        self.get_all_pages(
            workspace,
            "api/2.2/jobs/runs/get",
            json!({ "run_id": run.get() }),
        )
        .await
    }

    async fn repair_run(
        &self,
        workspace: &str,
        run: RunId,
        latest_repair_id: Option<u64>,
        launch: &LaunchRequest,
    ) -> Result<u64, DatabricksError> {
        const ENDPOINT: &str = "api/2.2/jobs/runs/repair";
        let mut body = json!({ "run_id": run.get(), "rerun_all_failed_tasks": true });
        if let Some(id) = latest_repair_id {
            body["latest_repair_id"] = json!(id);
        }
        // A repair runs with the job's current settings: the original
        // run-now's parameters are not applied again, so they are sent again.
        with_parameters(&mut body, launch);
        let v = self
            .call(
                workspace,
                reqwest::Method::POST,
                ENDPOINT,
                CallClass::Launch,
                body,
                None,
            )
            .await?;
        v.get("repair_id")
            .and_then(Value::as_u64)
            .ok_or_else(|| DatabricksError::Protocol {
                endpoint: ENDPOINT,
                reason: format!("no repair_id in {v}"),
            })
    }

    async fn get_run_history(
        &self,
        workspace: &str,
        run: RunId,
    ) -> Result<RunInfo, DatabricksError> {
        self.get_page(
            workspace,
            "api/2.2/jobs/runs/get",
            json!({ "run_id": run.get(), "include_history": true }),
        )
        .await
    }

    async fn get_job(&self, workspace: &str, job_id: u64) -> Result<JobInfo, DatabricksError> {
        self.get_all_pages(workspace, "api/2.2/jobs/get", json!({ "job_id": job_id }))
            .await
    }

    async fn list_runs(
        &self,
        workspace: &str,
        query: &RunsQuery,
        page_token: Option<&str>,
    ) -> Result<RunsPage, DatabricksError> {
        // 25 is the most runs/list gives per page.
        let mut q = json!({ "limit": 25, "expand_tasks": true });
        match query {
            RunsQuery::Active => q["active_only"] = json!(true),
            RunsQuery::StartedSince(ms) => q["start_time_from"] = json!(ms),
        }
        if let Some(t) = page_token {
            q["page_token"] = json!(t);
        }
        self.get_page(workspace, "api/2.2/jobs/runs/list", q).await
    }

    async fn get_output(
        &self,
        workspace: &str,
        run: RunId,
    ) -> Result<Option<String>, DatabricksError> {
        let v = self
            .call(
                workspace,
                reqwest::Method::GET,
                "api/2.2/jobs/runs/get-output",
                CallClass::Poll,
                json!({ "run_id": run.get() }),
                None,
            )
            .await?;
        Ok(v.pointer("/notebook_output/result")
            .and_then(Value::as_str)
            .map(str::to_owned))
    }

    async fn cancel_run(&self, workspace: &str, run: RunId) -> Result<(), DatabricksError> {
        self.call(
            workspace,
            reqwest::Method::POST,
            "api/2.2/jobs/runs/cancel",
            CallClass::Cancel,
            json!({ "run_id": run.get() }),
            None,
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use secrecy::SecretString;
    use wiremock::matchers::{body_partial_json, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::databricks::{ClientSettings, Credentials, WorkspaceSettings};

    fn client(uri: &str) -> Client {
        let mut workspaces = HashMap::new();
        workspaces.insert(
            "default".to_string(),
            WorkspaceSettings {
                host: url::Url::parse(&format!("{uri}/")).unwrap(),
                credentials: Credentials::Token(SecretString::from("dapi-test".to_string())),
            },
        );
        Client::new(
            &ClientSettings {
                workspaces,
                request_timeout: Duration::from_millis(500),
                retry_min_delay: Duration::from_millis(10),
                retry_max_delay: Duration::from_millis(50),
                retry_max_times: 3,
                launch_per_second: 0.0,
                poll_per_second: 0.0,
                cancel_per_second: 0.0,
                burst: 1,
            },
            None,
        )
        .unwrap()
    }

    fn token() -> IdempotencyToken {
        IdempotencyToken::derive("default", &crate::domain::PromiseId::parse("p").unwrap())
    }

    /// Launches once against a server that answers every POST with
    /// `answer`, which must be asked `times` times (checked when the server
    /// is dropped, on return).
    async fn launch_answered(
        answer: ResponseTemplate,
        times: u64,
    ) -> Result<RunId, DatabricksError> {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(answer)
            .expect(times)
            .mount(&server)
            .await;
        client(&server.uri())
            .launch("default", &run_now(), &token(), None)
            .await
    }

    fn run_now() -> LaunchRequest {
        LaunchRequest::RunNow {
            job_id: 7,
            job_parameters: None,
            notebook_params: None,
        }
    }

    #[tokio::test]
    async fn retries_429_then_succeeds_with_the_same_token() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/api/2.2/jobs/run-now"))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("Retry-After", "0")
                    .set_body_json(
                        json!({"error_code":"REQUEST_LIMIT_EXCEEDED","message":"slow down"}),
                    ),
            )
            .up_to_n_times(2)
            .expect(2)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/api/2.2/jobs/run-now"))
            .and(body_partial_json(
                json!({"idempotency_token": token().as_str(), "job_id": 7}),
            ))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"run_id": 99, "number_in_job": 99})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let run = client(&server.uri())
            .launch("default", &run_now(), &token(), None)
            .await
            .unwrap();
        assert_eq!(run.get(), 99);
    }

    #[tokio::test]
    async fn timeouts_are_retried_then_reported_transient() {
        // first try + 3 retries
        let answer = ResponseTemplate::new(200).set_delay(Duration::from_secs(2));
        let e = launch_answered(answer, 4).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("timeout"), "{e}");
    }

    #[tokio::test]
    async fn not_found_is_permanent_with_the_body() {
        let answer = ResponseTemplate::new(404).set_body_json(
            json!({"error_code":"RESOURCE_DOES_NOT_EXIST","message":"Job 7 does not exist."}),
        );
        match launch_answered(answer, 1).await {
            Err(DatabricksError::Permanent {
                status: 404, body, ..
            }) => {
                assert_eq!(body.error_code, "RESOURCE_DOES_NOT_EXIST");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn lock_contention_is_retried() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(409)
                    .set_body_json(json!({"error_code":"COULD_NOT_ACQUIRE_LOCK","message":"busy"})),
            )
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"run_id": 5})))
            .mount(&server)
            .await;
        let run = client(&server.uri())
            .launch("default", &run_now(), &token(), None)
            .await
            .unwrap();
        assert_eq!(run.get(), 5);
    }

    #[test]
    fn debug_hides_the_token() {
        let w = WorkspaceSettings {
            host: url::Url::parse("https://x.cloud.databricks.com").unwrap(),
            credentials: Credentials::Token(SecretString::from("dapi-very-secret".to_string())),
        };
        assert!(!format!("{w:?}").contains("very-secret"));
        let w = WorkspaceSettings {
            host: url::Url::parse("https://x.cloud.databricks.com").unwrap(),
            credentials: Credentials::OAuth {
                client_id: "sp-1".into(),
                client_secret: SecretString::from("oauth-very-secret".to_string()),
            },
        };
        assert!(!format!("{w:?}").contains("very-secret"));
    }

    fn run() -> RunId {
        RunId::new(5).unwrap()
    }

    /// A revoked or expired token (403 with a numeric code, or the older
    /// HTML page): a credentials failure, retryable, sent once (a PAT does
    /// not get better by asking again in the same call).
    #[tokio::test]
    async fn refused_credentials_are_neither_permanent_nor_retried_in_the_call() {
        for answer in [
            ResponseTemplate::new(403)
                .set_body_json(json!({"error_code": 403, "message": "Invalid access token."})),
            ResponseTemplate::new(403).set_body_string(
                "<html><head><title>Error 403 Invalid access token.</title></head><body><pre>Invalid access token.</pre></body></html>",
            ),
            ResponseTemplate::new(401).set_body_json(
                json!({"error_code": "UNAUTHENTICATED", "message": "Credential was not sent"}),
            ),
        ] {
            let e = launch_answered(answer, 1).await.unwrap_err();
            assert!(matches!(e, DatabricksError::Credentials { .. }), "{e}");
            assert!(e.is_retryable());
        }
    }

    #[tokio::test]
    async fn permission_denied_on_the_job_is_permanent() {
        let answer = ResponseTemplate::new(403).set_body_json(
                json!({"error_code": "PERMISSION_DENIED", "message": "User x does not have Manage Run permissions on job 7"}),
            );
        let e = launch_answered(answer, 1).await.unwrap_err();
        assert!(
            matches!(e, DatabricksError::Permanent { status: 403, .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_unknown_run_is_recognised() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/api/2.2/jobs/runs/get"))
            .respond_with(ResponseTemplate::new(400).set_body_json(
                json!({"error_code": "INVALID_PARAMETER_VALUE", "message": "Run 5 does not exist."}),
            ))
            .expect(1)
            .mount(&server)
            .await;
        let e = client(&server.uri())
            .get_run("default", run())
            .await
            .unwrap_err();
        assert!(e.is_unknown_run(), "{e}");
    }

    #[tokio::test]
    async fn the_hourly_quota_is_transient_and_not_retried_in_the_call() {
        let answer = ResponseTemplate::new(400).set_body_json(json!({
            "error_code": "INVALID_STATE",
            "message": "The number of jobs created in past 3600 seconds exceeds the limit of 10000."
        }));
        let e = launch_answered(answer, 1).await.unwrap_err();
        assert!(matches!(e, DatabricksError::Transient { .. }), "{e}");
    }

    #[tokio::test]
    async fn an_empty_success_body_is_an_answer() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/api/2.2/jobs/runs/cancel"))
            .respond_with(ResponseTemplate::new(200))
            .expect(1)
            .mount(&server)
            .await;
        client(&server.uri())
            .cancel_run("default", run())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn get_run_follows_every_page_of_tasks() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/api/2.2/jobs/runs/get"))
            .and(query_param("page_token", "2"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"run_id": 5, "tasks": [{"task_key": "c", "run_id": 8}]})),
            )
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/2.2/jobs/runs/get"))
            .and(query_param("page_token", "1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"run_id": 5, "tasks": [{"task_key": "b", "run_id": 7}], "next_page_token": "2"}),
            ))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/2.2/jobs/runs/get"))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"run_id": 5, "tasks": [{"task_key": "a", "run_id": 6}], "next_page_token": "1"}),
            ))
            .mount(&server)
            .await;
        let info = client(&server.uri())
            .get_run("default", run())
            .await
            .unwrap();
        let keys: Vec<&str> = info.tasks.iter().map(|t| t.task_key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(info.next_page_token, None);
    }
}
