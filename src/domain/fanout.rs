//! Parent triggers: one message that fans out to many runs and joins their
//! outcomes into one (docs/contracts.md, parent triggers).
//!
//! A parent trigger lists its children (`children`: each a `job_id` with
//! parameters or a `submit` body) or runs one job once per parameter set
//! (`for_each`). Each child becomes an ordinary promise with its own run;
//! the parent is a promise too, settled by its [`Join`] from the children's
//! outcomes. This module parses and describes; what decides a parent's
//! outcome is [`decide`], pure, so every rule of the join is tested here.

use std::collections::{BTreeMap, HashSet};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::ids::PromiseId;
use super::launch::{
    Launch, ParamValue, Parameters, TriggerError, check_tags, check_workspace, kind, param_map,
    parse_launch,
};
use super::promise::{Join, State};

/// The children of a parent trigger and how they are joined.
#[derive(Debug, Clone, PartialEq)]
pub struct FanOut {
    pub children: Vec<Child>,
    pub join: Join,
    pub fail_fast: bool,
    /// At most this many children pending at once (`None`: all).
    pub max_concurrency: Option<u32>,
}

impl FanOut {
    /// How many children are launched before any settles.
    pub fn first_window(&self) -> u32 {
        let n = u32::try_from(self.children.len()).unwrap_or(u32::MAX);
        self.max_concurrency.map_or(n, |m| m.min(n))
    }
}

/// One child as its parent trigger describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    pub id: PromiseId,
    pub launch: Launch,
    pub tags: BTreeMap<String, String>,
    pub workspace: Option<String>,
    /// The child's JSON, kept as its promise's `param.data`.
    pub raw: String,
}

/// One entry of a parent trigger's `children`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "runbridge child",
    description = "One child of a parent trigger: a job_id with its parameters, or a submit body.",
    extend(
        "oneOf" = [{"required": ["job_id"]}, {"required": ["submit"]}],
        "not" = {"required": ["job_parameters", "notebook_params"]},
        "dependentRequired" = {"job_parameters": ["job_id"], "notebook_params": ["job_id"]}
    )
)]
pub struct ChildMessage {
    /// The child's promise id (default `<parent id>/<n>`, n from 0). Unique
    /// among the parent's children, never the parent's own.
    #[schemars(
        length(min = 1, max = 200),
        regex(pattern = r"^(?!(.*/)?\.{1,2}(/|$))[A-Za-z0-9._:/-]+$")
    )]
    id: Option<String>,
    #[schemars(with = "Option<u64>", range(min = 1))]
    job_id: Option<Value>,
    #[schemars(with = "Option<BTreeMap<String, ParamValue>>")]
    job_parameters: Option<Map<String, Value>>,
    #[schemars(with = "Option<BTreeMap<String, ParamValue>>")]
    notebook_params: Option<Map<String, Value>>,
    #[schemars(with = "Option<Map<String, Value>>")]
    submit: Option<Value>,
    /// Laid over the parent's tags.
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 64,
        "propertyNames" = {"minLength": 1, "maxLength": 128},
        "additionalProperties" = {"type": "string", "maxLength": 1024}
    ))]
    tags: BTreeMap<String, String>,
    /// The child's workspace (default: the parent's).
    #[schemars(length(min = 1, max = 64))]
    workspace: Option<String>,
}

fn at(n: usize, e: TriggerError) -> TriggerError {
    TriggerError::Invalid(format!("children[{n}]: {e}"))
}

fn child_id(
    parent: &PromiseId,
    n: usize,
    given: Option<String>,
) -> Result<PromiseId, TriggerError> {
    let id = given.unwrap_or_else(|| format!("{parent}/{n}"));
    PromiseId::parse(&id).map_err(|e| TriggerError::Invalid(format!("child id {id:?}: {e}")))
}

fn count(n: usize, max: usize) -> Result<(), TriggerError> {
    if n > max {
        return Err(TriggerError::Invalid(format!(
            "at most {max} children (worker.max_children), got {n}"
        )));
    }
    if n == 0 {
        return Err(TriggerError::Invalid(
            "a parent needs at least one child".into(),
        ));
    }
    Ok(())
}

/// A parent's `children`, each parsed like a trigger of its own.
pub(super) fn children(
    parent: &PromiseId,
    items: Vec<Value>,
    max: usize,
) -> Result<Vec<Child>, TriggerError> {
    count(items.len(), max)?;
    let mut out = Vec::with_capacity(items.len());
    for (n, v) in items.into_iter().enumerate() {
        if !v.is_object() {
            return Err(at(
                n,
                TriggerError::Schema(format!("a child is an object, got {}", kind(&v))),
            ));
        }
        let raw = v.to_string();
        let c: ChildMessage =
            serde_json::from_value(v).map_err(|e| at(n, TriggerError::Schema(e.to_string())))?;
        let launch = parse_launch(c.job_id, c.job_parameters, c.notebook_params, c.submit)
            .map_err(|e| at(n, e))?;
        check_tags(&c.tags).map_err(|e| at(n, e))?;
        check_workspace(c.workspace.as_deref()).map_err(|e| at(n, e))?;
        out.push(Child {
            id: child_id(parent, n, c.id)?,
            launch,
            tags: c.tags,
            workspace: c.workspace,
            raw,
        });
    }
    unique(parent, &out)?;
    Ok(out)
}

/// `job_id` once per parameter set, each laid over the shared parameters.
pub(super) fn for_each(
    parent: &PromiseId,
    shared: Launch,
    sets: Vec<Value>,
    max: usize,
) -> Result<Vec<Child>, TriggerError> {
    count(sets.len(), max)?;
    let Launch::RunNow { job_id, params } = shared else {
        return Err(TriggerError::Invalid("for_each goes with job_id".into()));
    };
    let mut out = Vec::with_capacity(sets.len());
    for (n, set) in sets.into_iter().enumerate() {
        let Value::Object(set) = set else {
            return Err(TriggerError::Invalid(format!(
                "for_each[{n}] must be an object of parameters, got {}",
                kind(&set)
            )));
        };
        let own = param_map(&format!("for_each[{n}]"), set)?;
        let (params, field) = match &params {
            Parameters::Job(p) => (Parameters::Job(over(p, own)), "job_parameters"),
            Parameters::Notebook(p) => (Parameters::Notebook(over(p, own)), "notebook_params"),
        };
        let values = match &params {
            Parameters::Job(p) | Parameters::Notebook(p) => p.clone(),
        };
        out.push(Child {
            id: child_id(parent, n, None)?,
            launch: Launch::RunNow { job_id, params },
            tags: BTreeMap::new(),
            workspace: None,
            raw: json!({ "job_id": job_id, field: values }).to_string(),
        });
    }
    unique(parent, &out)?;
    Ok(out)
}

fn over(
    shared: &BTreeMap<String, String>,
    own: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut p = shared.clone();
    p.extend(own);
    p
}

fn unique(parent: &PromiseId, children: &[Child]) -> Result<(), TriggerError> {
    let mut seen = HashSet::with_capacity(children.len());
    for c in children {
        if &c.id == parent {
            return Err(TriggerError::Invalid(format!(
                "child id {:?} is the parent's own",
                c.id.as_str()
            )));
        }
        if !seen.insert(c.id.as_str()) {
            return Err(TriggerError::Invalid(format!(
                "child id {:?} is given twice",
                c.id.as_str()
            )));
        }
    }
    Ok(())
}

pub(super) fn fan_out(
    children: Vec<Child>,
    join: Option<Join>,
    fail_fast: Option<bool>,
    max_concurrency: Option<u32>,
) -> Result<FanOut, TriggerError> {
    let join = join.unwrap_or_default();
    let fail_fast = match (join, fail_fast) {
        (Join::AllSettled, Some(true)) => {
            return Err(TriggerError::Invalid(
                "all_settled waits for every child: fail_fast does not apply".into(),
            ));
        }
        (Join::AllSettled, _) => false,
        (_, f) => f.unwrap_or(true),
    };
    if max_concurrency == Some(0) {
        return Err(TriggerError::Invalid(
            "max_concurrency must be at least 1".into(),
        ));
    }
    Ok(FanOut {
        children,
        join,
        fail_fast,
        max_concurrency,
    })
}

/// A child's outcome as its parent recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildOutcome {
    pub index: u32,
    pub id: String,
    pub state: State,
    /// The child's value data (JSON text, or any text).
    pub data: Option<String>,
}

impl ChildOutcome {
    fn value(&self) -> Value {
        match &self.data {
            None => Value::Null,
            Some(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        }
    }

    fn described(&self) -> Value {
        json!({
            "index": self.index,
            "id": self.id,
            "state": self.state,
            "value": self.value(),
        })
    }
}

/// What the parent's record says when a child's outcome arrives.
#[derive(Debug, Clone, PartialEq)]
pub enum JoinState {
    /// The outcome that decides under `fail_fast` (the first rejected child
    /// under `all`, the first resolved under `any`), when there is one.
    Decisive(ChildOutcome),
    /// Every child settled: their outcomes in child order.
    Complete(Vec<ChildOutcome>),
    /// Nothing decided yet.
    Open,
}

/// A parent's settlement.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinOutcome {
    pub state: State,
    /// The parent's value data (JSON).
    pub value: Value,
    /// The `outcome` label of `runbridge_joins_total`.
    pub label: &'static str,
}

/// The parent's outcome, if its children's so far decide it.
pub fn decide(join: Join, fail_fast: bool, state: &JoinState) -> Option<JoinOutcome> {
    let rejected = |c: &ChildOutcome, reason: &str| JoinOutcome {
        state: State::Rejected,
        value: json!({
            "reason": reason,
            "child": c.described(),
        }),
        label: "rejected",
    };
    match (join, state) {
        (_, JoinState::Open) => None,
        (Join::All, JoinState::Decisive(c)) if fail_fast => Some(rejected(c, "child_rejected")),
        (Join::Any, JoinState::Decisive(c)) if fail_fast => Some(JoinOutcome {
            state: State::Resolved,
            value: json!({"index": c.index, "id": c.id, "value": c.value()}),
            label: "resolved",
        }),
        (_, JoinState::Decisive(_)) => None,
        (Join::All, JoinState::Complete(all)) => {
            match all.iter().find(|c| c.state != State::Resolved) {
                Some(c) => Some(rejected(c, "child_rejected")),
                None => Some(JoinOutcome {
                    state: State::Resolved,
                    value: Value::Array(all.iter().map(ChildOutcome::value).collect()),
                    label: "resolved",
                }),
            }
        }
        (Join::AllSettled, JoinState::Complete(all)) => Some(JoinOutcome {
            state: State::Resolved,
            value: Value::Array(all.iter().map(ChildOutcome::described).collect()),
            label: "resolved",
        }),
        (Join::Any, JoinState::Complete(all)) => {
            match all.iter().find(|c| c.state == State::Resolved) {
                Some(c) => Some(JoinOutcome {
                    state: State::Resolved,
                    value: json!({"index": c.index, "id": c.id, "value": c.value()}),
                    label: "resolved",
                }),
                None => Some(JoinOutcome {
                    state: State::Rejected,
                    value: json!({
                        "reason": "no_child_resolved",
                        "children": all.iter().map(ChildOutcome::described).collect::<Vec<_>>(),
                    }),
                    label: "rejected",
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Envelope, Trigger, TriggerRules, trigger::Work};

    fn parse(body: &str) -> Result<Trigger, TriggerError> {
        Trigger::parse(
            &Envelope {
                body: body.as_bytes().to_vec(),
                ..Default::default()
            },
            &TriggerRules::default(),
        )
    }

    fn fan(t: &Trigger) -> &FanOut {
        match &t.work {
            Work::FanOut(f) => f,
            Work::Run(_) => panic!("not a parent"),
        }
    }

    #[test]
    fn children_get_ids_launches_and_the_parents_tags() {
        let t = parse(
            r#"{"id":"p","tags":{"team":"a","k":"p"},"workspace":"w","max_concurrency":2,
               "children":[{"job_id":1,"job_parameters":{"d":1}},
                           {"id":"named","submit":{"run_name":"x"},"tags":{"k":"c"},"workspace":"v"}]}"#,
        )
        .unwrap();
        let f = fan(&t);
        assert_eq!(
            (f.join, f.fail_fast, f.first_window()),
            (Join::All, true, 2)
        );
        assert_eq!(f.children[0].id.as_str(), "p/0");
        assert_eq!(f.children[1].id.as_str(), "named");
        let c0 = t.child(0).unwrap();
        assert_eq!(c0.job_id(), Some(1));
        assert_eq!(c0.workspace.as_deref(), Some("w"));
        assert_eq!(c0.reply_to, None);
        let c1 = t.child(1).unwrap();
        assert_eq!(c1.workspace.as_deref(), Some("v"));
        assert_eq!(c1.tags["k"], "c");
        assert_eq!(c1.tags["team"], "a");
        assert!(matches!(c1.launch(), Some(Launch::Submit { .. })));
        assert!(t.child(2).is_none());
        assert_eq!(t.job_id(), None);
    }

    #[test]
    fn for_each_lays_each_set_over_the_shared_parameters() {
        let t = parse(
            r#"{"id":"b","job_id":7,"notebook_params":{"env":"prod","d":"x"},"join":"all_settled",
               "for_each":[{"d":"2026-01-01"},{"d":"2026-01-02","n":3}]}"#,
        )
        .unwrap();
        let f = fan(&t);
        assert_eq!(
            (f.join, f.fail_fast, f.first_window()),
            (Join::AllSettled, false, 2)
        );
        let Launch::RunNow {
            job_id: 7,
            params: Parameters::Notebook(p),
        } = &f.children[1].launch
        else {
            panic!("{:?}", f.children[1].launch)
        };
        assert_eq!(
            (p["env"].as_str(), p["d"].as_str(), p["n"].as_str()),
            ("prod", "2026-01-02", "3")
        );
        let raw: Value = serde_json::from_str(&f.children[1].raw).unwrap();
        assert_eq!(raw["notebook_params"]["d"], "2026-01-02");
        assert_eq!(f.children[1].id.as_str(), "b/1");
    }

    #[test]
    fn bad_parents_are_refused_with_reasons() {
        let cases = [
            (r#"{"id":"p","children":[]}"#, "at least one"),
            (
                r#"{"id":"p","children":[{"job_id":1}],"job_id":1}"#,
                "children were given",
            ),
            (
                r#"{"id":"p","children":[{"job_id":1}],"for_each":[{}],"job_id":1}"#,
                "not both",
            ),
            (
                r#"{"id":"p","children":[{"id":"x","job_id":1},{"id":"x","job_id":2}]}"#,
                "twice",
            ),
            (
                r#"{"id":"p","children":[{"id":"p","job_id":1}]}"#,
                "parent's own",
            ),
            (
                r#"{"id":"p","children":[{"job_id":1,"submit":{}}]}"#,
                "children[0]",
            ),
            (
                r#"{"id":"p","children":[{"job_id":1,"bogus":1}]}"#,
                "children[0]",
            ),
            (r#"{"id":"p","children":[3]}"#, "children[0]"),
            (
                r#"{"id":"p","children":[{"job_id":1}],"max_concurrency":0}"#,
                "at least 1",
            ),
            (
                r#"{"id":"p","children":[{"job_id":1}],"join":"all_settled","fail_fast":true}"#,
                "does not apply",
            ),
            (r#"{"id":"p","job_id":1,"join":"any"}"#, "go with children"),
            (
                r#"{"id":"p","submit":{},"for_each":[{}]}"#,
                "for_each goes with job_id",
            ),
            (
                r#"{"id":"p","job_id":1,"submit":{},"for_each":[{}]}"#,
                "both were given",
            ),
            (r#"{"id":"p","job_id":1,"for_each":[1]}"#, "for_each[0]"),
            (
                r#"{"id":"p","children":[{"job_id":1}],"join":"some"}"#,
                "unknown variant",
            ),
        ];
        for (body, says) in cases {
            let e = parse(body).unwrap_err().to_string();
            assert!(e.contains(says), "{body}: {e}");
        }
        let long = format!(
            r#"{{"id":"{}","children":[{{"job_id":1}}]}}"#,
            "x".repeat(199)
        );
        assert!(parse(&long).unwrap_err().to_string().contains("child id"));
        let many = format!(
            r#"{{"id":"p","job_id":1,"for_each":[{}]}}"#,
            vec!["{}"; 1001].join(",")
        );
        assert!(
            parse(&many)
                .unwrap_err()
                .to_string()
                .contains("at most 1000")
        );
    }

    fn out(index: u32, state: State, data: &str) -> ChildOutcome {
        ChildOutcome {
            index,
            id: format!("p/{index}"),
            state,
            data: Some(data.into()),
        }
    }

    #[test]
    fn all_resolves_with_values_in_order_or_names_the_failed_child() {
        let done = JoinState::Complete(vec![
            out(0, State::Resolved, "1"),
            out(1, State::Resolved, "text"),
        ]);
        let o = decide(Join::All, true, &done).unwrap();
        assert_eq!(
            (o.state, o.value.clone()),
            (State::Resolved, json!([1, "text"]))
        );
        let failed =
            JoinState::Decisive(out(3, State::RejectedTimedout, r#"{"reason":"timeout"}"#));
        let o = decide(Join::All, true, &failed).unwrap();
        assert_eq!(o.state, State::Rejected);
        assert_eq!(o.value["child"]["id"], "p/3");
        assert_eq!(o.value["child"]["state"], "REJECTED_TIMEDOUT");
        assert_eq!(o.value["child"]["value"]["reason"], "timeout");
        // Without fail_fast a failure waits for the rest, then decides.
        assert_eq!(decide(Join::All, false, &failed), None);
        let mixed = JoinState::Complete(vec![
            out(0, State::Resolved, "1"),
            out(1, State::Rejected, "x"),
        ]);
        assert_eq!(
            decide(Join::All, false, &mixed).unwrap().value["child"]["index"],
            1
        );
        assert_eq!(decide(Join::All, true, &JoinState::Open), None);
    }

    #[test]
    fn all_settled_and_any() {
        let mixed = JoinState::Complete(vec![
            out(0, State::Rejected, "no"),
            out(1, State::Resolved, "2"),
        ]);
        let o = decide(Join::AllSettled, false, &mixed).unwrap();
        assert_eq!(o.state, State::Resolved);
        assert_eq!(o.value[0]["state"], "REJECTED");
        assert_eq!(o.value[1]["value"], 2);
        let o = decide(Join::Any, false, &mixed).unwrap();
        assert_eq!(
            (o.state, o.value["index"].clone()),
            (State::Resolved, json!(1))
        );
        let first = JoinState::Decisive(out(4, State::Resolved, "\"eu\""));
        assert_eq!(
            decide(Join::Any, true, &first).unwrap().value["value"],
            "eu"
        );
        let none = JoinState::Complete(vec![
            out(0, State::Rejected, "a"),
            out(1, State::RejectedCanceled, "b"),
        ]);
        let o = decide(Join::Any, true, &none).unwrap();
        assert_eq!(o.state, State::Rejected);
        assert_eq!(o.value["reason"], "no_child_resolved");
    }
}
