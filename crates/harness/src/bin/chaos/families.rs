//! What must hold for parents and their children, checked from the final
//! records alone (not with runbridge's own join code): each parent settled
//! consistently with its children's outcomes under its join policy, a child
//! cancelled by its parent only when fail_fast let the parent settle early,
//! and a child without a run only when its parent cancelled it first.

use std::collections::HashMap;

use runbridge::domain::{Promise, State};
use serde_json::Value;

use crate::workload::ParentPlan;

/// Lifecycle states of a run that is still going (or about to).
pub const ACTIVE: [&str; 6] = [
    "PENDING",
    "QUEUED",
    "RUNNING",
    "TERMINATING",
    "BLOCKED",
    "WAITING_FOR_RETRY",
];

/// Runs of the emulator's record that are still active, by promise id.
pub fn active_runs(runs: &[Value]) -> Vec<String> {
    runs.iter()
        .filter(|r| ACTIVE.contains(&r["life_cycle_state"].as_str().unwrap_or("")))
        .map(|r| r["params"]["promise_id"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn by_parent(p: &Promise) -> bool {
    p.settled_by.as_deref() == Some("parent")
}

/// One message per violation, naming the parent.
pub fn check(
    parents: &[ParentPlan],
    promises: &HashMap<String, &Promise>,
    runs_per_promise: &HashMap<String, usize>,
) -> Vec<String> {
    let mut out = Vec::new();
    for plan in parents {
        if let Err(e) = check_one(plan, promises, runs_per_promise) {
            out.push(format!("parent {}: {e}", plan.id));
        }
    }
    out
}

fn check_one(
    plan: &ParentPlan,
    promises: &HashMap<String, &Promise>,
    runs_per_promise: &HashMap<String, usize>,
) -> Result<(), String> {
    let parent = promises.get(&plan.id).ok_or("no promise")?;
    if !parent.state.is_settled() {
        return Err("still pending".into());
    }
    let children: Vec<&Promise> = (0..plan.children)
        .map(|n| {
            promises
                .get(&plan.child_id(n))
                .copied()
                .ok_or_else(|| format!("child {n} has no promise"))
        })
        .collect::<Result<_, _>>()?;
    for (n, c) in children.iter().enumerate() {
        if !c.state.is_settled() {
            return Err(format!("child {n} still {}", c.state));
        }
        if by_parent(c) && c.state != State::RejectedCanceled {
            return Err(format!("child {n} settled by its parent as {}", c.state));
        }
        if by_parent(c) && !plan.fail_fast {
            return Err(format!(
                "child {n} cancelled, but without fail_fast the parent waits for every child"
            ));
        }
        if runs_per_promise.get(c.id.as_str()).copied().unwrap_or(0) == 0 && !by_parent(c) {
            return Err(format!(
                "child {n} ended {} without ever running, not cancelled by its parent",
                c.state
            ));
        }
        if c.parent.as_ref().map(|p| p.parent.as_str()) != Some(plan.id.as_str()) {
            return Err(format!("child {n} does not name its parent"));
        }
    }
    let value = parent.value.data_as_json();
    let named = |v: &Value| -> Result<(usize, &Promise), String> {
        let id = v
            .as_str()
            .ok_or_else(|| format!("no child named in {value}"))?;
        children
            .iter()
            .enumerate()
            .find(|(_, c)| c.id.as_str() == id)
            .map(|(n, c)| (n, *c))
            .ok_or_else(|| format!("names {id}, not one of its children"))
    };
    match (plan.join, parent.state) {
        ("all", State::Resolved) => {
            let want: Vec<Value> = children.iter().map(|c| c.value.data_as_json()).collect();
            if children.iter().any(|c| c.state != State::Resolved) {
                return Err("RESOLVED under all with a child not resolved".into());
            }
            if value != Value::Array(want) {
                return Err(format!(
                    "value {value} is not the children's values in order"
                ));
            }
        }
        ("all", State::Rejected) => {
            let (n, c) = named(&value["child"]["id"])?;
            if !c.state.is_rejection() || by_parent(c) {
                return Err(format!("rejected naming child {n}, which is {}", c.state));
            }
            if value["child"]["state"] != Value::String(c.state.to_string()) {
                return Err(format!(
                    "names child {n} as {}, it is {}",
                    value["child"]["state"], c.state
                ));
            }
        }
        ("all_settled", State::Resolved) => {
            let items = value.as_array().ok_or("value is not an array")?;
            if items.len() != children.len() {
                return Err(format!(
                    "{} outcomes for {} children",
                    items.len(),
                    children.len()
                ));
            }
            for (n, (item, c)) in items.iter().zip(&children).enumerate() {
                if item["state"] != Value::String(c.state.to_string())
                    || item["id"] != c.id.as_str()
                {
                    return Err(format!("outcome {n} is {item}, the child is {}", c.state));
                }
            }
        }
        ("any", State::Resolved) => {
            let (n, c) = named(&value["id"])?;
            if c.state != State::Resolved || value["value"] != c.value.data_as_json() {
                return Err(format!("resolved with child {n}, which is {}", c.state));
            }
        }
        ("any", State::Rejected) => {
            if let Some(n) = children
                .iter()
                .position(|c| !c.state.is_rejection() || by_parent(c))
            {
                return Err(format!(
                    "rejected under any, but child {n} is {}",
                    children[n].state
                ));
            }
        }
        (join, state) => return Err(format!("{state} is not an outcome of {join}")),
    }
    Ok(())
}
