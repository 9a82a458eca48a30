//! Parent triggers: fan-out to children, fan-in by join policy, and no child
//! outliving its parent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// A job whose notebook takes `n` and answers it after `delay_ms`, with the
/// callback values as job parameters (as a job defined today declares them)
/// and room for many runs at once.
async fn echo_job(app: &TestApp, outcome: &str, delay_ms: u64) -> u64 {
    let param = |name: &str| json!({"name": name, "default": ""});
    app.create_job(json!({
        "name": unique("echo"),
        "tasks": [{"task_key": "nb", "notebook_task": {"notebook_path": "/echo"}}],
        "parameters": [param("n"), param("promise_id"), param("url"), param("callback_token")],
        // Children run side by side (Jobs API 2.2 would run one at a time).
        "max_concurrent_runs": 100,
        "tags": {
            "emulator.outcome": outcome,
            "emulator.delay_ms": delay_ms.to_string(),
            "emulator.value": "{{n}}",
        },
    }))
    .await
}

fn child_ids(parent: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{parent}/{i}")).collect()
}

/// Each child's events, waiting for all of them and the parent's.
async fn family_events(
    app: &mut TestApp,
    parent: &str,
    children: &[String],
    limit: Duration,
) -> BTreeMap<String, Vec<Value>> {
    let mut ids = children.to_vec();
    ids.push(parent.to_owned());
    app.events_for_all(&ids, limit).await
}

/// `GET /promises/{id}` as an operator.
async fn api_get(app: &TestApp, id: &str) -> Value {
    let r = app
        .operator(app.http.get(format!("{}/promises/{id}", app.sidecar_url)))
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

/// The emulator's run of a child (by its promise_id parameter), if any
/// (a child cancelled before it was launched has none).
async fn run_of(app: &TestApp, id: &str) -> Option<Value> {
    app.runs_for(id).await.into_iter().next()
}

/// A parent of 50 children under `all`: 50 runs, one per token; the parent
/// resolves with the 50 values in order; one parent event and 50 child
/// events, each naming the parent.
#[tokio::test]
async fn fifty_children_resolve_the_parent_with_their_values_in_order() {
    let mut app = TestApp::spawn().await;
    let job = echo_job(&app, "callback", 100).await;
    let parent = unique("backfill");
    let sets: Vec<Value> = (0..50).map(|n| json!({"n": n})).collect();
    app.publish(&json!({"id": parent, "job_id": job, "for_each": sets, "tags": {"team": "data"}}))
        .await;
    let children = child_ids(&parent, 50);
    let events = family_events(&mut app, &parent, &children, Duration::from_secs(60)).await;

    let p = &events[&parent];
    assert_eq!(p.len(), 1, "one parent event: {p:?}");
    assert_eq!(p[0]["data"]["state"], "RESOLVED");
    assert_eq!(p[0]["data"]["settled_by"], "join");
    assert_eq!(p[0]["data"]["children"], 50);
    assert_eq!(p[0]["data"]["value"], json!((0..50).collect::<Vec<_>>()));
    let mut tokens = BTreeSet::new();
    for (n, id) in children.iter().enumerate() {
        let e = &events[id];
        assert_eq!(e.len(), 1, "one event for {id}");
        assert_eq!(e[0]["data"]["state"], "RESOLVED");
        assert_eq!(e[0]["data"]["parent"], json!(parent));
        assert_eq!(
            e[0]["data"]["tags"]["team"], "data",
            "children carry the parent's tags"
        );
        let runs = app.runs_for(id).await;
        assert_eq!(runs.len(), 1, "one run for {id}");
        assert_eq!(runs[0]["job_parameters"]["n"], n.to_string());
        tokens.insert(runs[0]["idempotency_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(tokens.len(), 50, "a token per child");
    app.assert_no_event(
        &parent,
        Duration::from_millis(1000),
        "one parent event only",
    )
    .await;

    // The API shows the parent with its children.
    let r = api_get(&app, &parent).await;
    assert_eq!(r["children"]["count"], 50);
    assert_eq!(r["children"]["join"], "all");
    assert_eq!(
        r["children"]["items"][7]["id"],
        json!(format!("{parent}/7"))
    );
    assert_eq!(r["children"]["items"][7]["state"], "RESOLVED");
    let c = api_get(&app, &format!("{parent}/7")).await;
    assert_eq!(c["parent"], json!(parent));
    app.stop().await;
}

/// `all` with one failing child under fail_fast: the parent is REJECTED
/// naming the child; every other child is cancelled with its run, and none
/// settles after its cancel.
#[tokio::test]
async fn a_failing_child_rejects_the_parent_and_cancels_the_rest() {
    let mut app = TestApp::spawn().await;
    let failing = echo_job(&app, "reject_callback", 300).await;
    let parent = unique("regions");
    let mut kids = vec![json!({"job_id": failing, "job_parameters": {"n": "eu"}})];
    kids.extend((1..10).map(|_| json!({"job_id": JOB_NEVER})));
    app.publish(&json!({"id": parent, "children": kids})).await;
    let children = child_ids(&parent, 10);
    let events = family_events(&mut app, &parent, &children, Duration::from_secs(30)).await;

    let p = &events[&parent][0]["data"];
    assert_eq!(p["state"], "REJECTED");
    assert_eq!(p["error"]["reason"], "child_rejected");
    assert_eq!(p["error"]["child"]["id"], json!(children[0]));
    assert_eq!(p["error"]["child"]["state"], "REJECTED");
    assert_eq!(events[&children[0]][0]["data"]["state"], "REJECTED");
    for id in &children[1..] {
        let e = &events[id];
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["data"]["state"], "REJECTED_CANCELED");
        assert_eq!(e[0]["data"]["settled_by"], "parent");
        assert_eq!(e[0]["data"]["error"]["reason"], "parent_settled");
    }
    for id in &children[1..] {
        wait_run_cancelled(&app, id).await;
    }
    // No child settles again after its cancel.
    let later = app
        .events_for(&children[3], Duration::from_millis(1500))
        .await;
    assert!(later.is_empty(), "{later:?}");
    for id in &children[1..] {
        assert_eq!(
            app.promise(id).await.unwrap().state.as_str(),
            "REJECTED_CANCELED"
        );
    }
    app.stop().await;
}

/// `max_concurrency = 5` over 40 children: the emulator never has more than
/// 5 of their runs active at once, and every child runs.
#[tokio::test]
async fn max_concurrency_bounds_the_runs_in_flight() {
    let mut app = TestApp::spawn().await;
    let job = echo_job(&app, "callback", 300).await;
    let parent = unique("bounded");
    let sets: Vec<Value> = (0..40).map(|n| json!({"n": n})).collect();
    app.publish(&json!({"id": parent, "job_id": job, "for_each": sets, "max_concurrency": 5}))
        .await;
    let children = child_ids(&parent, 40);
    let events = family_events(&mut app, &parent, &children, Duration::from_secs(90)).await;
    assert_eq!(events[&parent][0]["data"]["state"], "RESOLVED");
    let stats = app.emulator_stats().await;
    let peak = stats["max_active_runs"][job.to_string()].as_u64().unwrap();
    assert!(peak <= 5, "at most 5 runs at once, saw {peak}");
    assert!(peak >= 2, "children ran side by side (peak {peak})");
    let runs: usize = futures_util::future::join_all(children.iter().map(|id| app.runs_for(id)))
        .await
        .iter()
        .map(Vec::len)
        .sum();
    assert_eq!(runs, 40);
    app.stop().await;
}

/// An operator's cancel of the parent cancels its pending children with
/// their runs, and the children not launched yet never are.
#[tokio::test]
async fn cancelling_the_parent_cancels_the_tree() {
    let mut app = TestApp::spawn().await;
    let parent = unique("tree");
    let kids: Vec<Value> = (0..10).map(|_| json!({"job_id": JOB_NEVER})).collect();
    app.publish(&json!({"id": parent, "children": kids, "max_concurrency": 4}))
        .await;
    let children = child_ids(&parent, 10);
    for id in &children[..4] {
        wait_run_recorded(&app, id).await;
    }
    let r = app
        .operator(
            app.http
                .patch(format!("{}/promises/{parent}", app.sidecar_url)),
        )
        .json(&json!({"state": "REJECTED_CANCELED"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let events = family_events(&mut app, &parent, &children, Duration::from_secs(20)).await;
    assert_eq!(events[&parent][0]["data"]["settled_by"], "operator");
    for id in &children {
        assert_eq!(events[id].len(), 1, "{id}");
        assert_eq!(events[id][0]["data"]["state"], "REJECTED_CANCELED");
    }
    for id in &children[..4] {
        wait_run_cancelled(&app, id).await;
    }
    // Give a late fan-out step every chance: the rest never run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in &children[4..] {
        assert!(
            run_of(&app, id).await.is_none(),
            "{id} was launched after its parent was cancelled"
        );
    }
    app.stop().await;
}

/// A parent trigger that cannot be valid is dead-lettered whole, creating
/// nothing.
#[tokio::test]
async fn an_invalid_parent_is_dead_lettered_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let parent = unique("bad-parent");
    app.publish(
        &json!({"id": parent, "children": [{"job_id": 1}, {"job_id": 1, "workspace": "nowhere"}]}),
    )
    .await;
    let dead = app.dead_letters(Duration::from_secs(10), 1).await;
    assert_eq!(dead.len(), 1);
    assert!(app.promise(&parent).await.is_none());
    assert!(app.promise(&format!("{parent}/0")).await.is_none());
    app.stop().await;
}

/// The console shows a parent with its children's states, a child links
/// its parent, and one cancel of the parent (the form) cancels the tree.
#[tokio::test]
async fn the_console_shows_the_tree_and_cancels_it() {
    use crate::ui::{csrf_of, get, log_in, post_form};
    let mut app = TestApp::spawn().await;
    let parent = unique("console-tree");
    let kids = json!([{"job_id": JOB_CALLBACK}, {"job_id": JOB_NEVER}, {"job_id": JOB_NEVER}]);
    app.publish(&json!({"id": parent, "children": kids, "join": "all_settled"}))
        .await;
    let children = child_ids(&parent, 3);
    app.first_event(&children[0], Duration::from_secs(15)).await;
    for id in &children[1..] {
        wait_run_recorded(&app, id).await;
    }
    let cookie = log_in(&app).await;
    let (status, page) = get(&app, &format!("/ui/promises/{parent}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("3 children, joined by all_settled"), "{page}");
    assert!(page.contains(&format!(r#"href="/ui/promises/{}""#, children[0])));
    assert!(
        page.contains(">RESOLVED</td>") && page.contains(">PENDING</td>"),
        "{page}"
    );
    assert!(page.contains("Cancel the whole tree"));
    let (_, child_page) = get(
        &app,
        &format!("/ui/promises/{}", children[1]),
        Some(&cookie),
    )
    .await;
    assert!(child_page.contains(&format!(r#"href="/ui/promises/{parent}""#)));
    let csrf = csrf_of(&page);
    let fields = [
        ("csrf", csrf.as_str()),
        ("id", parent.as_str()),
        ("action", "cancel"),
        ("confirm", "yes"),
    ];
    let r = post_form(&app, "/ui/act", Some(&cookie), &fields).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let events = family_events(&mut app, &parent, &children[1..], Duration::from_secs(15)).await;
    assert_eq!(events[&parent][0]["data"]["state"], "REJECTED_CANCELED");
    for id in &children[1..] {
        assert_eq!(events[id][0]["data"]["settled_by"], "parent");
    }
    let (_, page) = get(&app, &format!("/ui/promises/{parent}"), Some(&cookie)).await;
    // The two children's cells (the parent's own state cell has an id).
    let cancelled = r#"state-REJECTED_CANCELED">REJECTED_CANCELED</td>"#;
    assert_eq!(page.matches(cancelled).count(), 2, "{page}");
    app.stop().await;
}

/// `runbridge promise get` prints a parent with its children and their
/// states.
#[tokio::test]
async fn the_cli_prints_the_tree() {
    let mut app = TestApp::spawn().await;
    let parent = unique("cli-tree");
    app.publish(&json!({"id": parent, "job_id": JOB_CALLBACK, "for_each": [{"n": 1}, {"n": 2}]}))
        .await;
    app.first_event(&parent, Duration::from_secs(15)).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
        .args(["promise", "get", &parent])
        .envs(app.env_vars())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "RESOLVED");
    assert_eq!(v["children"]["count"], 2);
    assert_eq!(
        v["children"]["items"][1]["id"],
        json!(format!("{parent}/1"))
    );
    assert_eq!(v["children"]["items"][1]["state"], "RESOLVED");
    app.stop().await;
}

/// The store's family steps are safe to repeat: a child's outcome is
/// recorded once however often it is reported (the relay retries after a
/// crash), the answer is read from what is recorded, the window widens once
/// per settled child, and cancelling a child twice changes it once.
#[tokio::test]
async fn family_steps_in_the_store_are_idempotent() {
    use runbridge::domain::fanout::JoinState;
    use runbridge::domain::promise::{ChildOf, Family};
    use runbridge::domain::{Join, Payload, PromiseId, SettledBy, State};
    use runbridge::store::{
        ChildCancel, ChildReport, CreateOutcome, Families, PromiseStore, Settle, Timeout,
    };
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let store = &app.store;
    let parent = PromiseId::parse(&unique("store-parent")).unwrap();
    let ids: Vec<PromiseId> = (0..3)
        .map(|n| PromiseId::parse(&format!("{parent}/{n}")).unwrap())
        .collect();
    let family = Family {
        children: 3,
        join: Join::All,
        fail_fast: true,
        max_concurrency: Some(1),
        launched: 1,
    };
    let new = new_promise(&parent, Timeout::After(Duration::from_secs(600)));
    let CreateOutcome::Created(p) = store
        .create_parent(&new, &family, &ids, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("created");
    };
    assert_eq!(p.family, Some(family.clone()));
    // A second create finds it and changes nothing.
    assert!(matches!(
        store
            .create_parent(&new, &family, &ids, Duration::ZERO)
            .await
            .unwrap(),
        CreateOutcome::Existing(_)
    ));
    let child = |n: u32| runbridge::store::NewPromise {
        parent: Some(ChildOf {
            parent: parent.clone(),
            index: n,
        }),
        ..new_promise(&ids[n as usize], Timeout::After(Duration::from_secs(600)))
    };
    let settle = |n: usize, state: State, data: &str| Settle {
        id: ids[n].clone(),
        target: state,
        value: Payload::data(data),
        ikey: None,
        strict: false,
        settled_by: SettledBy::Operator,
        cancel_run: false,
        capability: None,
    };
    store.create(&child(0)).await.unwrap();
    let runbridge::store::SettleOutcome::Settled(c0) = store
        .settle(&settle(0, State::Resolved, "7"))
        .await
        .unwrap()
    else {
        panic!("settled");
    };
    for _ in 0..3 {
        assert_eq!(
            store.child_settled(&c0).await.unwrap(),
            ChildReport::Join(JoinState::Open)
        );
    }
    // Widened once (1 settled + max_concurrency 1), not once per report.
    assert_eq!(
        store
            .get(&parent)
            .await
            .unwrap()
            .unwrap()
            .family
            .unwrap()
            .launched,
        2
    );
    let recorded = store.children(&parent).await.unwrap();
    assert_eq!(recorded[0].state, Some(State::Resolved));
    assert_eq!(recorded[1].state, None);
    // A promise the parent does not list as that child is not one.
    let stranger = runbridge::domain::Promise {
        id: PromiseId::parse("someone-else").unwrap(),
        ..c0.clone()
    };
    assert_eq!(
        store.child_settled(&stranger).await.unwrap(),
        ChildReport::NotAChild
    );

    // The first rejection decides under all; its repeat answers the same.
    store.create(&child(1)).await.unwrap();
    let runbridge::store::SettleOutcome::Settled(c1) = store
        .settle(&settle(1, State::Rejected, "boom"))
        .await
        .unwrap()
    else {
        panic!("settled");
    };
    let first = store.child_settled(&c1).await.unwrap();
    assert!(
        matches!(&first, ChildReport::Join(JoinState::Decisive(o)) if o.index == 1 && o.data.as_deref() == Some("boom")),
        "{first:?}"
    );
    assert_eq!(store.child_settled(&c1).await.unwrap(), first);

    // Cancelling: child 2 was never created: written cancelled, once.
    let p = store.get(&parent).await.unwrap().unwrap();
    let entry = |n: usize| runbridge::store::ChildEntry {
        index: n as u32,
        id: ids[n].clone(),
        state: None,
    };
    assert_eq!(
        store.cancel_child(&p, &entry(2)).await.unwrap(),
        ChildCancel::Cancelled
    );
    assert_eq!(
        store.cancel_child(&p, &entry(2)).await.unwrap(),
        ChildCancel::Already
    );
    let c2 = store.get(&ids[2]).await.unwrap().unwrap();
    assert_eq!(c2.state, State::RejectedCanceled);
    assert_eq!(c2.settled_by.as_deref(), Some("parent"));
    // A later create of it (a late fan-out step) finds it settled.
    assert!(matches!(
        store.create(&child(2)).await.unwrap(),
        CreateOutcome::Existing(p) if p.state == State::RejectedCanceled
    ));
    app.stop().await;
}

/// A parent that times out, and one an operator resolves, leave no child
/// pending or running.
#[tokio::test]
async fn a_parent_timed_out_or_resolved_by_hand_leaves_no_child_running() {
    let mut app = TestApp::spawn().await;
    let timed = unique("timed-parent");
    let resolved = unique("resolved-parent");
    let kids: Vec<Value> = (0..3).map(|_| json!({"job_id": JOB_NEVER})).collect();
    app.publish(&json!({"id": timed, "children": kids, "timeout_seconds": 3}))
        .await;
    app.publish(&json!({"id": resolved, "children": kids}))
        .await;
    let (timed_kids, resolved_kids) = (child_ids(&timed, 3), child_ids(&resolved, 3));
    for id in &resolved_kids {
        wait_run_recorded(&app, id).await;
    }
    let r = app
        .operator(
            app.http
                .patch(format!("{}/promises/{resolved}", app.sidecar_url)),
        )
        .json(&json!({"state": "RESOLVED", "value": {"data": "done by hand"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut all = timed_kids.clone();
    all.extend(resolved_kids.iter().cloned());
    all.extend([timed.clone(), resolved.clone()]);
    let events = app.events_for_all(&all, Duration::from_secs(20)).await;
    assert_eq!(events[&timed][0]["data"]["state"], "REJECTED_TIMEDOUT");
    assert_eq!(events[&resolved][0]["data"]["settled_by"], "operator");
    for id in &resolved_kids {
        assert_eq!(events[id][0]["data"]["state"], "REJECTED_CANCELED");
    }
    for id in timed_kids.iter().chain(&resolved_kids) {
        // A child shares its parent's deadline: it times out with it, or is
        // cancelled by it; either way its run is cancelled.
        assert!(
            events[id][0]["data"]["state"]
                .as_str()
                .unwrap()
                .starts_with("REJECTED_")
        );
        wait_run_cancelled(&app, id).await;
    }
    app.stop().await;
}

/// Nothing waits on a listener: with no queue bound to the events exchange
/// every event is unroutable and kept in the outbox, yet a parent of seven
/// children, two at a time, launches them all and settles; once a queue is
/// bound, the kept events are delivered.
#[tokio::test]
async fn a_family_completes_while_nobody_listens_and_its_events_follow() {
    let mut app = TestApp::spawn_with(Options {
        unheard: true,
        ..Default::default()
    })
    .await;
    let job = echo_job(&app, "callback", 50).await;
    let parent = unique("unheard");
    let sets: Vec<Value> = (0..7).map(|n| json!({"n": n})).collect();
    app.publish(&json!({"id": parent, "job_id": job, "for_each": sets, "max_concurrency": 2}))
        .await;
    let children = child_ids(&parent, 7);
    eventually(
        Duration::from_secs(60),
        "every child and the parent settled",
        || async {
            for id in children.iter().chain([&parent]) {
                if !app.promise(id).await?.state.is_settled() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    assert_eq!(
        app.promise(&parent).await.unwrap().state.as_str(),
        "RESOLVED"
    );
    // Bound now: the events kept for want of a listener arrive.
    app.events = app
        .broker
        .listen(Some(&app.settings.amqp.events_exchange), "promise.#")
        .await
        .unwrap();
    let events = family_events(&mut app, &parent, &children, Duration::from_secs(30)).await;
    assert_eq!(events[&parent][0]["data"]["state"], "RESOLVED");
    app.stop().await;
}
