//! No single request or message takes runbridge or its Redis down: what a
//! caller chooses (an id filter, tags, a page of the console, a header) has
//! a bounded cost, whatever its shape.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runbridge::domain::IdPattern;
use runbridge::domain::id_pattern::reference_match;
use serde_json::{Value, json};

use crate::helpers::*;

/// `GET /promises?id=...`, bounded: the status and the ids found.
async fn search_ids(app: &TestApp, filter: &str) -> (u16, BTreeSet<String>) {
    let r = app
        .operator(
            app.http
                .get(format!("{}/promises", app.sidecar_url))
                .query(&[("id", filter), ("limit", "1000")]),
        )
        // A bound on liveness, not a timing: a linear matcher answers in
        // milliseconds, a backtracking one after hours.
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let ids = body["promises"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    (status, ids)
}

/// The worst filter for a backtracking matcher (a Lua `.*` per star) against
/// a 200-character id: eight stars that never match make it try every way
/// of splitting the id, which takes Redis hours inside one uninterruptible
/// script. The matcher answers at once, matching or not, and a ninth star
/// is refused before Redis sees it.
#[tokio::test]
async fn a_search_filter_full_of_stars_answers_at_once() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let id = format!("{}-{}", app.name, "a".repeat(199 - app.name.len()));
    assert_eq!(id.len(), 200);
    app.create_promise(&id).await;

    let no = format!("{}-*a*a*a*a*a*a*a*b", app.name);
    assert_eq!(search_ids(&app, &no).await, (200, BTreeSet::new()));
    let yes = format!("{}-*a*a*a*a*a*a*a*a", app.name);
    assert_eq!(search_ids(&app, &yes).await, (200, BTreeSet::from([id])));
    // Runs of stars are one star.
    let runs = format!("{}-{}a", app.name, "*".repeat(100));
    assert_eq!(search_ids(&app, &runs).await.1.len(), 1);
    let nine = format!("{}-{}b", app.name, "*a".repeat(9));
    assert_eq!(search_ids(&app, &nine).await.0, 400);
}

/// The same filter in a control message (which needs only publish rights
/// on the control queue) costs no more: a cancel behind it, on the same
/// queue, is carried out.
#[tokio::test]
async fn a_control_message_with_a_starry_filter_does_not_hold_the_next_one() {
    let app = TestApp::spawn().await;
    let long = format!("{}-{}", app.name, "a".repeat(199 - app.name.len()));
    let victim = format!("{}-victim", app.name);
    app.create_promise(&long).await;
    app.create_promise(&victim).await;
    for body in [
        json!({"action": "cancel", "id": format!("{}-*a*a*a*a*a*a*a*b", app.name)}),
        json!({"action": "cancel", "id": victim}),
    ] {
        app.publisher
            .publish_control(
                &app.settings.amqp.control_queue,
                body.to_string().as_bytes(),
            )
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(30), "the second cancel", || async {
        app.promise(&victim)
            .await
            .filter(|p| p.state.as_str() == "REJECTED_CANCELED")
    })
    .await;
    let long = app.promise(&long).await.unwrap();
    assert_eq!(long.state.as_str(), "PENDING", "the filter matched nothing");
}

/// The store's matcher (search.lua) against the plain definition of a glob,
/// over random ids and filters of a small alphabet (so pieces overlap,
/// repeat and sit at both ends): every search returns exactly the ids the
/// reference matches.
#[tokio::test]
async fn the_store_matches_ids_as_the_reference_does() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let word = |rng: &mut StdRng, alphabet: &[u8], max: usize| -> String {
        let n = rng.random_range(0..=max);
        (0..n)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
            .collect()
    };
    let mut ids = BTreeSet::new();
    while ids.len() < 40 {
        ids.insert(format!("{}-{}", app.name, word(&mut rng, b"ab-", 12)));
    }
    for id in &ids {
        app.create_promise(id).await;
    }
    for _ in 0..150 {
        let glob = format!("{}-{}", app.name, word(&mut rng, b"ab-*", 10));
        let (status, found) = search_ids(&app, &glob).await;
        if IdPattern::parse(&glob).is_err() {
            assert_eq!(status, 400, "seed {seed}: {glob}: over the star limit");
            continue;
        }
        assert_eq!(status, 200, "seed {seed}: {glob}");
        let expected: BTreeSet<String> = ids
            .iter()
            .filter(|id| reference_match(&glob, id))
            .cloned()
            .collect();
        assert_eq!(found, expected, "seed {seed}: {glob}");
    }
}

/// Triggers whose `traceparent` holds a line break (it would go on to
/// Databricks as an HTTP header no client can build) are run without it,
/// and a normal trigger published behind 64 of them, more than every
/// prefetch slot, is not held up: all of them end RESOLVED.
#[tokio::test]
async fn malformed_traceparents_hold_no_trigger_up() {
    let mut app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..64 {
        let id = format!("{}-tp-{i}", app.name);
        let body = serde_json::to_vec(&trigger(&id, JOB_CALLBACK)).unwrap();
        let bad = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Injected: 1";
        app.publisher
            .publish_trigger_traced(&body, bad)
            .await
            .unwrap();
        ids.push(id);
    }
    let normal = format!("{}-normal", app.name);
    app.publish(&trigger(&normal, JOB_CALLBACK)).await;
    ids.push(normal.clone());
    let events = app.events_for_all(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(events[id][0]["data"]["state"], "RESOLVED", "{id}");
    }
    app.stop().await;
}

/// Tags have one set of limits whichever way a promise is made: the
/// Durable Promise API and Resonate's protocol refuse what a trigger would
/// (too many, an empty key, an oversized key), and create nothing.
#[tokio::test]
async fn tags_have_the_triggers_limits_on_every_way_in() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (n, tags) in [
        json!(many),
        json!({"": "v"}),
        json!({ "k".repeat(5000): "v" }),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("{}-tags-{n}", app.name);
        let r = app
            .operator(app.http.post(format!("{}/promises", app.sidecar_url)))
            .json(&json!({"id": id, "tags": tags}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "POST /promises with tags #{n}");
        let r = app
            .operator(app.http.post(format!("{}/", app.sidecar_url)))
            .json(&json!({"kind": "promise.create", "head": {}, "data": {
                "id": id, "timeoutAt": chrono::Utc::now().timestamp_millis() + 60_000, "tags": tags}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "promise.create with tags #{n}");
        assert!(app.promise(&id).await.is_none(), "nothing was created");
    }
    app.stop().await;
}
