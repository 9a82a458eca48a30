//! Databricks' error answers, read the way Databricks' own SDK reads them,
//! and what each one means for the bridge.
//!
//! The rules follow `databricks-sdk` (Python), whose `errors/` package is
//! generated from Databricks' API specification:
//! - a body is `{"error_code", "message"}`, where `error_code` is usually a
//!   string but is a *number* on some gateway answers (a revoked or expired
//!   token: `403 {"error_code": 403, "message": "Invalid access token."}`);
//!   older workspaces answer that with an HTML page instead, read from its
//!   `<pre>` or `<title>` (`_HtmlErrorDeserializer`); a body of the form
//!   `ERROR_CODE: message` is read as such (`_StringErrorDeserializer`); an
//!   empty body is the status's reason (`_EmptyDeserializer`);
//! - `runs/get` answers a run that does not exist with **400**
//!   `INVALID_PARAMETER_VALUE` "Run N does not exist" (the SDK's override
//!   "Job Runs InvalidParameterValue=>ResourceDoesNotExist"), not 404;
//! - 429 and 503 carry `Retry-After` in seconds (`_RetryAfterCustomizer`).
//!
//! `docs/databricks-fidelity.md` lists every rule with its source.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// `{"error_code", "message"}`, Databricks's error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// A string code; a numeric one (`403`) is kept as its digits.
    #[serde(default, deserialize_with = "code_text")]
    pub error_code: String,
    #[serde(default)]
    pub message: String,
}

fn code_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// The most of a non-JSON body kept as the message.
const MAX_MESSAGE: usize = 500;

fn reason_code(status: u16) -> String {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("ERROR")
        .replace(' ', "_")
        .to_uppercase()
}

/// The text between the first `<tag>` and its `</tag>`, if any.
fn element<'a>(html: &'a str, tag: &str) -> Option<&'a str> {
    let start = html.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = html[start..].find(&format!("</{tag}>"))?;
    Some(&html[start..start + len])
}

fn clip(s: &str) -> String {
    s.trim().chars().take(MAX_MESSAGE).collect()
}

impl ApiErrorBody {
    /// An error answer's body, whatever form it came in. Pure, for the fuzz
    /// target `error_body`; a body that is not the documented JSON gives a
    /// message of at most 500 characters.
    pub fn from_answer(status: u16, bytes: &[u8]) -> Self {
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(bytes) {
            return Self::from_json(&m);
        }
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim();
        if text.is_empty() {
            let code = reason_code(status);
            return ApiErrorBody {
                message: code.replace('_', " ").to_lowercase(),
                error_code: code,
            };
        }
        if let Some(m) = element(text, "pre").or_else(|| element(text, "title")) {
            return ApiErrorBody {
                error_code: reason_code(status),
                message: clip(m),
            };
        }
        if let Some((code, msg)) = text.split_once(": ")
            && !code.is_empty()
            && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        {
            return ApiErrorBody {
                error_code: code.to_owned(),
                message: clip(msg),
            };
        }
        ApiErrorBody {
            error_code: reason_code(status),
            message: clip(text),
        }
    }
}

impl ApiErrorBody {
    /// A JSON error body, as the SDK's `_StandardErrorDeserializer` reads
    /// it: `{"error_code", "message"}` (no message: "request failed"); an
    /// API 1.2 `{"error": ...}` gives the message; a SCIM error
    /// `{"detail", "status", "scimType"}` (RFC 7644 §3.12) gives the message
    /// `"<scimType> <detail>"` and the code `SCIM_<status>`.
    fn from_json(m: &serde_json::Map<String, Value>) -> Self {
        let text = |k: &str| match m.get(k) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        };
        let message = match m.get("message") {
            Some(Value::String(s)) => s.clone(),
            // Not the documented body: cut like any other text.
            Some(_) => clip(&text("message").unwrap_or_default()),
            None => "request failed".into(),
        };
        let mut body = ApiErrorBody {
            error_code: text("error_code").unwrap_or_default(),
            message,
        };
        if let Some(e) = text("error") {
            body.message = clip(&e);
        }
        if let Some(detail) = text("detail").filter(|d| !d.is_empty()) {
            let detail = if detail == "null" {
                "SCIM API Internal Error".to_owned()
            } else {
                detail
            };
            let scim_type = text("scimType").unwrap_or_default();
            body.message = clip(&format!("{scim_type} {detail}"));
            body.error_code = format!("SCIM_{}", text("status").unwrap_or_default());
        }
        body
    }
}

/// What an error answer means for the call that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The workspace refused the credentials (401; 403 other than a
    /// `PERMISSION_DENIED` on the resource): the operator's to fix, so the
    /// work waits rather than fails.
    Credentials,
    /// 429, 5xx, a lock, "temporarily unavailable": retried by the client.
    Transient,
    /// The hourly quota of runs a workspace may create: try again later,
    /// but not within this call (the quota frees over minutes).
    Quota,
    /// Refused for good: the caller's request is wrong.
    Permanent,
}

/// Error codes that mean "try again" whatever the HTTP status.
const TRANSIENT_CODES: &[&str] = &[
    "COULD_NOT_ACQUIRE_LOCK",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED",
];

/// Decides an error answer's class (pure; unit-tested).
pub fn classify(status: u16, body: &ApiErrorBody) -> ErrorClass {
    if status == 401 || (status == 403 && body.error_code != "PERMISSION_DENIED") {
        return ErrorClass::Credentials;
    }
    if body.error_code == "INVALID_STATE" && body.message.contains("in past 3600 seconds") {
        return ErrorClass::Quota;
    }
    if status == 429 || status >= 500 || TRANSIENT_CODES.contains(&body.error_code.as_str()) {
        return ErrorClass::Transient;
    }
    ErrorClass::Permanent
}

/// Does this refusal say the run does not exist? Databricks answers an
/// unknown run with 400 `INVALID_PARAMETER_VALUE` "Run N does not exist"
/// (or "Run: N in job: M doesn't exist"); 404 `RESOURCE_DOES_NOT_EXIST` is
/// accepted too.
pub fn is_unknown_run(status: u16, body: &ApiErrorBody) -> bool {
    match status {
        404 => true,
        400 => {
            matches!(
                body.error_code.as_str(),
                "INVALID_PARAMETER_VALUE" | "RESOURCE_DOES_NOT_EXIST"
            ) && body.message.starts_with("Run")
                && (body.message.contains("does not exist")
                    || body.message.contains("doesn't exist"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: &str, message: &str) -> ApiErrorBody {
        ApiErrorBody {
            error_code: code.into(),
            message: message.into(),
        }
    }

    #[test]
    fn numeric_error_codes_are_read() {
        let b = ApiErrorBody::from_answer(
            403,
            br#"{"error_code": 403, "message": "Invalid access token."}"#,
        );
        assert_eq!(b, body("403", "Invalid access token."));
        assert_eq!(classify(403, &b), ErrorClass::Credentials);
    }

    #[test]
    fn html_pages_are_read_from_pre_then_title() {
        let page = b"<html>\n<head>\n<meta http-equiv=\"Content-Type\" content=\"text/html;charset=utf-8\"/>\n<title>Error 403 Invalid access token.</title>\n</head>\n<body><h2>HTTP ERROR 403</h2>\n<p>Problem accessing /api/2.2/jobs/run-now. Reason:\n<pre>    Invalid access token.</pre></p>\n</body>\n</html>";
        let b = ApiErrorBody::from_answer(403, page);
        assert_eq!(b, body("FORBIDDEN", "Invalid access token."));
        assert_eq!(classify(403, &b), ErrorClass::Credentials);
        let b = ApiErrorBody::from_answer(503, b"<html><title>Service Unavailable</title></html>");
        assert_eq!(b.message, "Service Unavailable");
    }

    #[test]
    fn scim_and_api_1_2_bodies_keep_their_message() {
        let b = ApiErrorBody::from_answer(
            403,
            br#"{"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "detail": "User not authorized.", "status": "403"}"#,
        );
        assert_eq!(b, body("SCIM_403", "User not authorized."));
        let b = ApiErrorBody::from_answer(
            400,
            br#"{"detail": "null", "status": "400", "scimType": "invalidValue"}"#,
        );
        assert_eq!(b, body("SCIM_400", "invalidValue SCIM API Internal Error"));
        let b = ApiErrorBody::from_answer(500, br#"{"error": "Cluster c is not running"}"#);
        assert_eq!(b, body("", "Cluster c is not running"));
        assert_eq!(
            ApiErrorBody::from_answer(400, b"{}").message,
            "request failed"
        );
        // A message that is not a string is not the documented body: cut.
        let long = format!(r#"{{"message": ["{}"]}}"#, "x".repeat(2000));
        assert!(
            ApiErrorBody::from_answer(400, long.as_bytes())
                .message
                .len()
                <= 500
        );
    }

    #[test]
    fn string_and_empty_bodies() {
        assert_eq!(
            ApiErrorBody::from_answer(400, b"INVALID_PARAMETER_VALUE: bad run"),
            body("INVALID_PARAMETER_VALUE", "bad run")
        );
        assert_eq!(
            ApiErrorBody::from_answer(404, b""),
            body("NOT_FOUND", "not found")
        );
        let long = "x".repeat(2000);
        assert_eq!(
            ApiErrorBody::from_answer(500, long.as_bytes())
                .message
                .len(),
            500
        );
    }

    #[test]
    fn classes() {
        assert_eq!(
            classify(401, &body("UNAUTHENTICATED", "")),
            ErrorClass::Credentials
        );
        assert_eq!(
            classify(
                403,
                &body(
                    "PERMISSION_DENIED",
                    "User x does not have Manage Run permissions on job 7"
                )
            ),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(429, &body("REQUEST_LIMIT_EXCEEDED", "")),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(503, &body("TEMPORARILY_UNAVAILABLE", "")),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(409, &body("COULD_NOT_ACQUIRE_LOCK", "")),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(
                400,
                &body(
                    "INVALID_STATE",
                    "The number of jobs created in past 3600 seconds exceeds the limit of 10000"
                )
            ),
            ErrorClass::Quota
        );
        assert_eq!(
            classify(400, &body("INVALID_PARAMETER_VALUE", "x")),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn unknown_runs_as_databricks_answers_them() {
        assert!(is_unknown_run(
            400,
            &body("INVALID_PARAMETER_VALUE", "Run 123 does not exist.")
        ));
        assert!(is_unknown_run(
            400,
            &body("INVALID_PARAMETER_VALUE", "Run: 1 in job: 2 doesn't exist")
        ));
        assert!(is_unknown_run(404, &body("RESOURCE_DOES_NOT_EXIST", "")));
        assert!(!is_unknown_run(
            400,
            &body("INVALID_PARAMETER_VALUE", "Job 7 does not exist.")
        ));
        assert!(!is_unknown_run(
            400,
            &body("INVALID_PARAMETER_VALUE", "run_id must be positive")
        ));
    }
}
