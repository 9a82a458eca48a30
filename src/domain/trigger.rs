//! The trigger message (docs/contracts.md, the trigger message), parsed once at the edge.
//!
//! [`Trigger::parse`] is the only way to get a [`Trigger`]; its error says,
//! in words a producer can act on, why a message was refused. The worker
//! dead-letters on that error and nothing else happens.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::fanout::{self, FanOut};
use super::ids::PromiseId;
pub use super::launch::{Launch, Parameters, TriggerError};
use super::launch::{ParamValue, check_tags, check_workspace, kind, parse_launch};
use super::promise::Join;
use super::retry::{RetryMessage, RetryPolicy};

/// What the broker module hands over from one AMQP delivery: the body plus
/// the properties the contract gives meaning to.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
}

/// Limits applied while parsing; they come from config.
#[derive(Debug, Clone)]
pub struct TriggerRules {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// The most children one parent trigger may have.
    pub max_children: usize,
    /// What a `reply_to` queue's name must start with (`amqp.reply_to_prefix`).
    pub reply_to_prefix: String,
}

/// Names of queues that RabbitMQ makes and only it can: a server-named
/// queue, and the direct reply-to pseudo-queue as a consumer sees it.
const SERVER_NAMED_REPLIES: [&str; 2] = ["amq.gen-", "amq.rabbitmq.reply-to"];

impl TriggerRules {
    /// A trigger's `reply_to`, if it names a queue runbridge may answer in:
    /// the completion is published there by the default exchange, so an
    /// arbitrary name would let a producer have runbridge publish into any
    /// queue of the vhost (the control queue, another application's).
    fn reply_to(&self, r: &str) -> Result<(), TriggerError> {
        let allowed = std::iter::once(self.reply_to_prefix.as_str())
            .chain(SERVER_NAMED_REPLIES)
            .any(|p| !p.is_empty() && r.starts_with(p));
        if allowed {
            return Ok(());
        }
        Err(TriggerError::Invalid(format!(
            "reply_to {r:?} is not a reply queue: its name must start with {:?} (amqp.reply_to_prefix), or be a server-named queue (amq.gen-...) or RabbitMQ's direct reply-to",
            self.reply_to_prefix
        )))
    }
}

impl Default for TriggerRules {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(86_400),
            max_timeout: Duration::from_secs(30 * 86_400),
            max_children: 1000,
            reply_to_prefix: "runbridge.reply.".into(),
        }
    }
}

impl TriggerRules {
    /// For reading back a trigger that was accepted when it arrived (a
    /// parent's, at each fan-out step): limits lowered since then must not
    /// strand a parent already running.
    pub fn accepted() -> Self {
        Self {
            default_timeout: Duration::from_secs(86_400),
            max_timeout: Duration::MAX,
            max_children: usize::MAX,
            reply_to_prefix: "runbridge.reply.".into(),
        }
    }
}

/// What a trigger asks for: one run, or children that each get one.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    Run(Launch),
    FanOut(FanOut),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub id: PromiseId,
    pub work: Work,
    pub timeout: Duration,
    pub heartbeat: Option<Duration>,
    pub cancel_on_timeout: bool,
    pub tags: BTreeMap<String, String>,
    pub workspace: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    /// The body as received, kept as the promise's `param.data`.
    pub raw: String,
    /// The trigger's own retry policy (for a parent: each child's).
    pub retry: Option<RetryPolicy>,
}

impl Trigger {
    /// The job a single-run trigger runs (a parent runs none itself).
    pub fn job_id(&self) -> Option<u64> {
        match &self.work {
            Work::Run(l) => l.job_id(),
            Work::FanOut(_) => None,
        }
    }

    /// The launch of a single-run trigger.
    pub fn launch(&self) -> Option<&Launch> {
        match &self.work {
            Work::Run(l) => Some(l),
            Work::FanOut(_) => None,
        }
    }

    /// Child `n` of a parent trigger as a trigger of its own: its launch,
    /// the parent's tags under its own, its workspace or the parent's, the
    /// parent's heartbeat, timeout rule and trace. No reply: the parent
    /// answers the producer.
    pub fn child(&self, n: usize) -> Option<Trigger> {
        let Work::FanOut(f) = &self.work else {
            return None;
        };
        let c = f.children.get(n)?;
        let mut tags = self.tags.clone();
        tags.extend(c.tags.clone());
        Some(Trigger {
            id: c.id.clone(),
            work: Work::Run(c.launch.clone()),
            timeout: self.timeout,
            heartbeat: self.heartbeat,
            cancel_on_timeout: self.cancel_on_timeout,
            tags,
            workspace: c.workspace.clone().or_else(|| self.workspace.clone()),
            reply_to: None,
            correlation_id: None,
            traceparent: self.traceparent.clone(),
            raw: c.raw.clone(),
            retry: self.retry.clone(),
        })
    }
}

/// The largest trigger body parsed (1 MiB). A trigger names a job and a
/// few parameters; anything bigger is refused before the JSON parser sees
/// it, so a hostile body costs a length check, not a parse.
pub const MAX_TRIGGER_BYTES: usize = 1 << 20;

pub use super::tags::{MAX_TAG_KEY, MAX_TAG_VALUE, MAX_TAGS};

/// The trigger message as it travels (docs/contracts.md, the trigger message). Its JSON Schema
/// (`docs/schemas/trigger.schema.json`, `runbridge schema trigger`) is derived
/// from this struct, so the document and the parser cannot drift apart. What a
/// schema cannot say is checked in [`Trigger::parse`] and written in the
/// descriptions: the id may come from the AMQP `message_id` instead, and
/// `timeout_seconds` has a configured upper limit.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "runbridge trigger",
    description = "A request to run a Databricks job (job_id), a one-time run (submit), or many children joined into one outcome (children, or job_id with for_each), published to the trigger queue as application/json. Exactly one of job_id, submit and children.",
    extend(
        "oneOf" = [{"required": ["job_id"]}, {"required": ["submit"]}, {"required": ["children"]}],
        "not" = {"required": ["job_parameters", "notebook_params"]},
        "dependentRequired" = {"job_parameters": ["job_id"], "notebook_params": ["job_id"], "for_each": ["job_id"]},
        "dependentSchemas" = {
            "join": {"anyOf": [{"required": ["children"]}, {"required": ["for_each"]}]},
            "fail_fast": {"anyOf": [{"required": ["children"]}, {"required": ["for_each"]}]},
            "max_concurrency": {"anyOf": [{"required": ["children"]}, {"required": ["for_each"]}]}
        }
    )
)]
pub struct TriggerMessage {
    /// The promise id and the idempotency key of the whole request; when
    /// absent, the AMQP message_id is used. The same id twice never starts a
    /// second run.
    /// No "." or ".." segment between slashes.
    #[schemars(
        length(min = 1, max = 200),
        regex(pattern = r"^(?!(.*/)?\.{1,2}(/|$))[A-Za-z0-9._:/-]+$")
    )]
    id: Option<String>,
    /// The Databricks job to run with `jobs/run-now`.
    // A `Value` so that a string or a negative number gets a message of ours.
    #[schemars(with = "Option<u64>", range(min = 1))]
    job_id: Option<Value>,
    /// Job-level parameters for `run-now` (values become strings).
    #[schemars(with = "Option<BTreeMap<String, ParamValue>>")]
    job_parameters: Option<Map<String, Value>>,
    /// Legacy notebook parameters for `run-now`, instead of job_parameters.
    #[schemars(with = "Option<BTreeMap<String, ParamValue>>")]
    notebook_params: Option<Map<String, Value>>,
    /// A `jobs/runs/submit` body, for a one-time run.
    #[schemars(with = "Option<Map<String, Value>>")]
    submit: Option<Value>,
    /// The promise deadline in seconds (default and upper limit from config:
    /// `worker.default_timeout_seconds`, `worker.max_timeout_seconds`).
    #[schemars(range(min = 1))]
    timeout_seconds: Option<u64>,
    /// The notebook must heartbeat at least this often, or the promise times out.
    #[schemars(range(min = 1))]
    heartbeat_seconds: Option<u64>,
    /// Cancel the run when the promise times out (default true).
    cancel_on_timeout: Option<bool>,
    /// Copied onto the promise and every event. Keys 1-128 bytes, values at
    /// most 1,024 bytes (the schema counts characters: the same for ASCII).
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 64,
        "propertyNames" = {"minLength": 1, "maxLength": 128},
        "additionalProperties" = {"type": "string", "maxLength": 1024}
    ))]
    tags: BTreeMap<String, String>,
    /// The name of a configured Databricks workspace (default: the default one).
    #[schemars(length(min = 1, max = 64))]
    workspace: Option<String>,
    /// A parent trigger: the children to run, each an ordinary promise with
    /// its own run (id `<parent id>/<n>`, n from 0, unless given). At most
    /// `worker.max_children` (default 1,000).
    #[schemars(with = "Option<Vec<fanout::ChildMessage>>", length(min = 1))]
    children: Option<Vec<Value>>,
    /// A parent trigger running `job_id` once per parameter set, each set
    /// laid over job_parameters (or notebook_params) when given. At most
    /// `worker.max_children` (default 1,000).
    #[schemars(with = "Option<Vec<BTreeMap<String, ParamValue>>>", length(min = 1))]
    for_each: Option<Vec<Value>>,
    /// How a parent's outcome follows from its children's (default all).
    join: Option<Join>,
    /// Settle the parent at the first outcome that decides it and cancel
    /// the children still running (default true for all and any; all_settled
    /// always waits for every child). When false the parent waits for every
    /// child to settle, then decides.
    fail_fast: Option<bool>,
    /// At most this many of the parent's children pending at once; the next
    /// is launched as one settles (default: all at once).
    #[schemars(range(min = 1))]
    max_concurrency: Option<u32>,
    /// Another attempt when the run fails in a retryable way (for a parent:
    /// each child's policy). Without it, the configuration's `[retry]`
    /// default for the job or workspace applies, if any.
    retry: Option<RetryMessage>,
}

impl Trigger {
    pub fn parse(env: &Envelope, rules: &TriggerRules) -> Result<Self, TriggerError> {
        if env.body.len() > MAX_TRIGGER_BYTES {
            return Err(TriggerError::Json(format!(
                "the body is {} bytes; at most {MAX_TRIGGER_BYTES} are accepted",
                env.body.len()
            )));
        }
        let raw = std::str::from_utf8(&env.body)
            .map_err(|e| TriggerError::Json(e.to_string()))?
            .to_owned();
        let value: Value =
            serde_json::from_str(&raw).map_err(|e| TriggerError::Json(e.to_string()))?;
        if !value.is_object() {
            return Err(TriggerError::Schema(format!(
                "the body must be a JSON object, got {}",
                kind(&value)
            )));
        }
        let mut w: TriggerMessage =
            serde_json::from_value(value).map_err(|e| TriggerError::Schema(e.to_string()))?;

        let id = match (w.id, &env.message_id) {
            (Some(id), _) => PromiseId::parse(&id)?,
            (None, Some(mid)) if !mid.is_empty() => PromiseId::parse(mid)?,
            _ => return Err(TriggerError::MissingId),
        };

        let fan = w.children.is_some()
            || w.for_each.is_some()
            || w.join.is_some()
            || w.fail_fast.is_some()
            || w.max_concurrency.is_some();
        let children = match (w.children.take(), w.for_each.take()) {
            (Some(_), Some(_)) => {
                return Err(TriggerError::Invalid(
                    "give children or for_each, not both".into(),
                ));
            }
            (Some(children), None) => {
                if w.job_id.is_some() || w.submit.is_some() {
                    return Err(TriggerError::LaunchChoice(
                        "children were given with job_id or submit",
                    ));
                }
                if w.job_parameters.is_some() || w.notebook_params.is_some() {
                    return Err(TriggerError::Invalid(
                        "job_parameters/notebook_params go with job_id; put each child's in the child".into(),
                    ));
                }
                Some(fanout::children(&id, children, rules.max_children)?)
            }
            (None, Some(sets)) => {
                let shared = parse_launch(
                    w.job_id.take(),
                    w.job_parameters.take(),
                    w.notebook_params.take(),
                    w.submit.take(),
                )?;
                Some(fanout::for_each(&id, shared, sets, rules.max_children)?)
            }
            (None, None) if fan => {
                return Err(TriggerError::Invalid(
                    "join, fail_fast and max_concurrency go with children or for_each".into(),
                ));
            }
            (None, None) => None,
        };
        let work = match children {
            Some(children) => Work::FanOut(fanout::fan_out(
                children,
                w.join,
                w.fail_fast,
                w.max_concurrency,
            )?),
            None => Work::Run(parse_launch(
                w.job_id,
                w.job_parameters,
                w.notebook_params,
                w.submit,
            )?),
        };

        let timeout = match w.timeout_seconds {
            None => rules.default_timeout,
            Some(0) => {
                return Err(TriggerError::Invalid(
                    "timeout_seconds must be at least 1".into(),
                ));
            }
            Some(s) if Duration::from_secs(s) > rules.max_timeout => {
                return Err(TriggerError::Invalid(format!(
                    "timeout_seconds {s} is over the limit of {}",
                    rules.max_timeout.as_secs()
                )));
            }
            Some(s) => Duration::from_secs(s),
        };
        let heartbeat = match w.heartbeat_seconds {
            None => None,
            Some(0) => {
                return Err(TriggerError::Invalid(
                    "heartbeat_seconds must be at least 1".into(),
                ));
            }
            Some(s) => Some(Duration::from_secs(s)),
        };

        check_tags(&w.tags)?;
        check_workspace(w.workspace.as_deref())?;
        let reply_to = env.reply_to.clone().filter(|s| !s.is_empty());
        if let Some(r) = &reply_to {
            rules.reply_to(r)?;
        }
        let retry = match &w.retry {
            None => None,
            Some(m) => {
                let job_runs = match &work {
                    Work::Run(l) => l.job_id().is_some(),
                    Work::FanOut(f) => f.children.iter().all(|c| c.launch.job_id().is_some()),
                };
                Some(RetryPolicy::parse(m, job_runs).map_err(TriggerError::Invalid)?)
            }
        };

        Ok(Trigger {
            id,
            work,
            timeout,
            heartbeat,
            cancel_on_timeout: w.cancel_on_timeout.unwrap_or(true),
            tags: w.tags,
            workspace: w.workspace,
            reply_to,
            correlation_id: env.correlation_id.clone(),
            traceparent: env.traceparent.clone(),
            raw,
            retry,
        })
    }
}

#[cfg(test)]
mod reply_to {
    use super::*;

    fn with_reply_to(r: &str) -> Result<Trigger, TriggerError> {
        let env = Envelope {
            body: br#"{"id": "r-1", "job_id": 7}"#.to_vec(),
            reply_to: Some(r.into()),
            ..Default::default()
        };
        Trigger::parse(&env, &TriggerRules::default())
    }

    #[test]
    fn only_reply_queues_are_answered() {
        for ok in [
            "runbridge.reply.r-1",
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNzQ2OTA5OAAAZpEAAAAAZzu8Ow==",
            "",
        ] {
            assert!(with_reply_to(ok).is_ok(), "{ok:?} refused");
        }
        for bad in [
            "runbridge.control",
            "orders",
            "runbridge.replyX",
            "amq.direct",
        ] {
            let e = with_reply_to(bad).expect_err(bad).to_string();
            assert!(e.contains("runbridge.reply."), "{e}");
        }
    }
}

/// Hostile input: whatever arrives, parsing answers (no panic),
/// and the worst cases are refused before they cost anything.
#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn env(body: Vec<u8>, message_id: Option<String>) -> Envelope {
        Envelope {
            body,
            message_id,
            reply_to: None,
            correlation_id: None,
            traceparent: None,
        }
    }

    /// JSON of any shape, with the trigger's own field names most of the time.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(|b| json!(b)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            "\\PC{0,40}".prop_map(|s| json!(s)),
        ];
        let key = prop_oneof![
            Just("id".to_string()),
            Just("job_id".to_string()),
            Just("submit".to_string()),
            Just("job_parameters".to_string()),
            Just("notebook_params".to_string()),
            Just("tags".to_string()),
            Just("timeout_seconds".to_string()),
            Just("heartbeat_seconds".to_string()),
            Just("workspace".to_string()),
            Just("cancel_on_timeout".to_string()),
            Just("children".to_string()),
            Just("for_each".to_string()),
            Just("join".to_string()),
            Just("fail_fast".to_string()),
            Just("max_concurrency".to_string()),
            "\\PC{0,12}",
        ];
        leaf.prop_recursive(4, 48, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::domain::hostile_cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_get_an_answer(body in prop::collection::vec(any::<u8>(), 0..512), mid in prop::option::of("\\PC{0,220}")) {
            let _ = Trigger::parse(&env(body, mid), &TriggerRules::default());
        }

        #[test]
        fn arbitrary_json_gets_an_answer_and_what_parses_is_valid(v in json_value(), mid in prop::option::of("[a-z0-9./%-]{0,210}")) {
            let body = serde_json::to_vec(&v).unwrap();
            if let Ok(t) = Trigger::parse(&env(body, mid), &TriggerRules::default()) {
                // What parses satisfies the limits the parser promises.
                prop_assert!(PromiseId::parse(t.id.as_str()).is_ok());
                prop_assert!(t.tags.len() <= MAX_TAGS);
                prop_assert!(t.timeout <= TriggerRules::default().max_timeout);
                if let Work::FanOut(f) = &t.work {
                    prop_assert!(!f.children.is_empty());
                    prop_assert!(f.children.len() <= TriggerRules::default().max_children);
                    for n in 0..f.children.len() {
                        let c = t.child(n).unwrap();
                        prop_assert!(c.launch().is_some() && c.id != t.id);
                    }
                }
            }
        }
    }

    #[test]
    fn a_ten_mib_number_is_refused_before_parsing() {
        let mut body = br#"{"id":"x","job_id":"#.to_vec();
        body.extend(std::iter::repeat_n(b'9', 10 << 20));
        body.push(b'}');
        // The length check's error, not the parser's: refused unparsed.
        let e = Trigger::parse(&env(body, None), &TriggerRules::default()).unwrap_err();
        assert!(e.to_string().contains("at most 1048576"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing() {
        // 500,000 nested arrays fit in 1 MiB; serde_json stops at depth 128.
        let depth = 500_000;
        let mut body = Vec::with_capacity(2 * depth + 40);
        body.extend_from_slice(br#"{"id":"x","job_id":1,"tags":"#);
        body.extend(std::iter::repeat_n(b'[', depth));
        body.extend(std::iter::repeat_n(b']', depth));
        body.push(b'}');
        assert!(body.len() <= MAX_TRIGGER_BYTES);
        let e = Trigger::parse(&env(body, None), &TriggerRules::default()).unwrap_err();
        assert!(e.to_string().contains("recursion limit"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Trigger, TriggerError> {
        Trigger::parse(
            &Envelope {
                body: body.as_bytes().to_vec(),
                ..Default::default()
            },
            &TriggerRules::default(),
        )
    }

    #[test]
    fn design_example_parses() {
        let t = parse(
            r#"{"id":"nightly-sales-2026-11-23","job_id":123,"job_parameters":{"date":"2026-11-23"},
               "timeout_seconds":3600,"heartbeat_seconds":600,"cancel_on_timeout":true,"tags":{"team":"growth"}}"#,
        )
        .unwrap();
        assert_eq!(t.id.as_str(), "nightly-sales-2026-11-23");
        assert_eq!(t.job_id(), Some(123));
        assert_eq!(t.timeout, Duration::from_secs(3600));
        assert_eq!(t.heartbeat, Some(Duration::from_secs(600)));
        assert_eq!(t.tags["team"], "growth");
        match t.work {
            Work::Run(Launch::RunNow {
                params: Parameters::Job(p),
                ..
            }) => assert_eq!(p["date"], "2026-11-23"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn id_falls_back_to_message_id() {
        let t = Trigger::parse(
            &Envelope {
                body: br#"{"job_id":1}"#.to_vec(),
                message_id: Some("from-amqp".into()),
                ..Default::default()
            },
            &TriggerRules::default(),
        )
        .unwrap();
        assert_eq!(t.id.as_str(), "from-amqp");
        assert_eq!(t.timeout, TriggerRules::default().default_timeout);
        assert!(t.cancel_on_timeout);
    }

    #[test]
    fn refusals_say_why() {
        assert!(matches!(parse("not json"), Err(TriggerError::Json(_))));
        assert!(matches!(parse("[1]"), Err(TriggerError::Schema(_))));
        assert_eq!(parse(r#"{"job_id":1}"#), Err(TriggerError::MissingId));
        assert_eq!(
            parse(r#"{"id":"a","job_id":1,"submit":{}}"#),
            Err(TriggerError::LaunchChoice("both were given"))
        );
        assert_eq!(
            parse(r#"{"id":"a"}"#),
            Err(TriggerError::LaunchChoice("neither was given"))
        );
        assert!(matches!(
            parse(r#"{"id":"a b","job_id":1}"#),
            Err(TriggerError::Id(_))
        ));
        assert!(matches!(
            parse(r#"{"id":"a","job_id":-1}"#),
            Err(TriggerError::Invalid(_))
        ));
        assert!(matches!(
            parse(r#"{"id":"a","job_id":1,"bogus":1}"#),
            Err(TriggerError::Schema(_))
        ));
        assert!(matches!(
            parse(r#"{"id":"a","job_id":1,"timeout_seconds":0}"#),
            Err(TriggerError::Invalid(_))
        ));
        assert!(matches!(
            parse(r#"{"id":"a","job_id":1,"tags":{"k":1}}"#),
            Err(TriggerError::Schema(_))
        ));
        assert!(matches!(
            parse(r#"{"id":"a","submit":[]}"#),
            Err(TriggerError::Invalid(_))
        ));
        let e = parse(r#"{"id":"a","job_id":1,"job_parameters":{"x":[1]}}"#).unwrap_err();
        assert!(e.to_string().contains("job_parameters.x"), "{e}");
    }

    #[test]
    fn scalar_parameters_become_strings() {
        let t = parse(r#"{"id":"a","job_id":1,"notebook_params":{"n":3,"b":true}}"#).unwrap();
        match t.work {
            Work::Run(Launch::RunNow {
                params: Parameters::Notebook(p),
                ..
            }) => {
                assert_eq!(p["n"], "3");
                assert_eq!(p["b"], "true");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
