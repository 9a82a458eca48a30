//! Searches walk the partitions' indexes: what one returns while promises
//! are created and settled around it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use runbridge::domain::PromiseId;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::helpers::*;

/// One full search (every page) for pending promises of `tag`, kind "keep".
async fn search_all(app: &TestApp, tag: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut url = format!(
            "{}/promises?state=PENDING&tags[t]={tag}&tags[kind]=keep&limit={limit}",
            app.sidecar_url
        );
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = app.operator(app.http.get(url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        for p in page["promises"].as_array().unwrap() {
            out.push(p["id"].as_str().unwrap().to_owned());
        }
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
    panic!("a search did not end in 10,000 pages");
}

/// While one task creates promises that stay pending, one after another,
/// and another creates and settles promises beside them, every complete
/// search (three promises a page, so many pages and steps) returns, in each
/// partition, every kept promise created before the latest one it returns:
/// never a later-created promise while an earlier-created one is missing.
/// The kept ids sort in no relation to their creation order, so a walk that
/// split a second still open for creations would show it.
#[tokio::test]
async fn a_search_never_skips_an_earlier_promise_it_passed_a_later_one_for() {
    // Two partitions: each sees many creations while a search is in it.
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![("redis.partitions", "2".into())],
        ..Default::default()
    })
    .await;
    let keys = app.settings.keys().unwrap();
    let tag = app.name.clone();
    let done = Arc::new(AtomicBool::new(false));
    // Kept promises in creation order (each created only after the one
    // before it was answered).
    let created: Arc<Mutex<Vec<String>>> = Arc::default();
    let create = |id: String, kind: &'static str| {
        let (app_http, url, tag) = (app.http.clone(), app.sidecar_url.clone(), tag.clone());
        let req = app.operator(app_http.post(format!("{url}/promises")));
        async move {
            let r = req
                .json(&json!({"id": id, "tags": {"t": tag, "kind": kind}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        }
    };
    let keeper = {
        let (done, created, create, name) =
            (done.clone(), created.clone(), create, app.name.clone());
        async move {
            let mut n: u64 = 0;
            while !done.load(Ordering::Relaxed) {
                // A scrambled prefix: byte order is not creation order.
                let id = format!("{name}-k{:016x}-{n}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                create(id.clone(), "keep").await;
                created.lock().await.push(id);
                n += 1;
            }
        }
    };
    let churn = {
        let done = done.clone();
        let (http, url, name) = (app.http.clone(), app.sidecar_url.clone(), app.name.clone());
        let app = &app;
        async move {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                let id = format!("{name}-c{n}");
                create(id.clone(), "churn").await;
                let r = app
                    .operator(http.patch(format!("{url}/promises/{id}")))
                    .json(
                        &json!({"state": "RESOLVED", "value": {"headers": {}, "data": "\"done\""}}),
                    )
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "settle {id}: {}", r.status());
                n += 1;
            }
            n
        }
    };
    let searcher = {
        let (done, created, app, tag, keys) = (
            done.clone(),
            created.clone(),
            &app,
            tag.clone(),
            keys.clone(),
        );
        async move {
            let mut searches = 0;
            let mut longest = 0;
            // Bounded: 3 s of load, then the other tasks stop.
            let until = tokio::time::Instant::now() + Duration::from_secs(3);
            while tokio::time::Instant::now() < until {
                let found: BTreeSet<String> = search_all(app, &tag, 3).await.into_iter().collect();
                let order = created.lock().await.clone();
                let rank: BTreeMap<&str, usize> = order
                    .iter()
                    .enumerate()
                    .map(|(i, id)| (id.as_str(), i))
                    .collect();
                // Per partition: the latest kept promise returned, and every
                // earlier one of the partition must be there too.
                let partition = |id: &str| keys.partition(&PromiseId::parse(id).unwrap());
                let mut latest: BTreeMap<u32, usize> = BTreeMap::new();
                for id in &found {
                    // A promise answered after `order` was copied has no rank yet.
                    if let Some(r) = rank.get(id.as_str()) {
                        let e = latest.entry(partition(id)).or_default();
                        *e = (*e).max(*r);
                    }
                }
                for (i, id) in order.iter().enumerate() {
                    let p = partition(id);
                    if latest.get(&p).is_some_and(|l| i < *l) {
                        assert!(
                            found.contains(id),
                            "search {searches}: {id} (created #{i}, partition {p}) is missing, \
                             while #{} of the same partition was returned",
                            latest[&p]
                        );
                    }
                }
                longest = longest.max(found.len());
                searches += 1;
            }
            done.store(true, Ordering::Relaxed);
            (searches, longest)
        }
    };
    let ((), churned, (searches, longest)) = tokio::join!(keeper, churn, searcher);
    let kept = created.lock().await.len();
    eprintln!(
        "{searches} searches (up to {longest} found) over {kept} kept and {churned} churned promises"
    );
    assert!(
        searches >= 3 && kept >= 50 && churned >= 20,
        "too little happened to show anything"
    );
    // At rest, a search returns exactly the kept promises.
    let found: BTreeSet<String> = search_all(&app, &tag, 7).await.into_iter().collect();
    let all: BTreeSet<String> = created.lock().await.iter().cloned().collect();
    assert_eq!(found, all);
    app.stop().await;
}

/// Promises stored by a version without search indexes (a record and its
/// pending count, nothing else) are found once indexed, as every worker's
/// start does it (once: it marks the deployment done).
#[tokio::test]
async fn promises_stored_before_the_indexes_are_indexed_once() {
    use runbridge::store::PromiseStore;
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let Some((_, mut conn)) = app.promise_key(&format!("{}-x", app.name)).await else {
        eprintln!("skipped: rewriting the indexes needs the standalone Redis");
        app.stop().await;
        return;
    };
    let keys = app.settings.keys().unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = format!("{}-old-{i}", app.name);
        let r = app
            .operator(app.http.post(format!("{}/promises", app.sidecar_url)))
            .json(&json!({"id": id, "tags": {"t": app.name}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        ids.push(id);
    }
    for id in &ids[..2] {
        let r = app
            .operator(app.http.patch(format!("{}/promises/{id}", app.sidecar_url)))
            .json(&json!({"state": "RESOLVED", "value": {"headers": {}, "data": "\"x\""}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    // What the older version left: no per-second ids, no settled order.
    let mut unindex = redis::pipe();
    for p in 0..keys.partitions() {
        let seconds: Vec<u64> = redis::cmd("ZRANGE")
            .arg(keys.pending_seconds(p))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        for s in seconds {
            unindex.cmd("DEL").arg(keys.pending_in_second(p, s));
        }
        unindex.cmd("DEL").arg(keys.settled_order(p));
    }
    let _: () = unindex.query_async(&mut conn).await.unwrap();
    let search = |states| {
        let q = runbridge::store::SearchQuery {
            id: runbridge::domain::IdPattern::parse(&format!("{}-old-*", app.name)).unwrap(),
            states,
            limit: 100,
            ..Default::default()
        };
        let store = app.store.clone();
        async move {
            let mut found: Vec<String> = store
                .search(&q)
                .await
                .unwrap()
                .promises
                .into_iter()
                .map(|p| p.id.as_str().to_owned())
                .collect();
            found.sort();
            found
        }
    };
    assert!(search(None).await.is_empty(), "the indexes were emptied");

    let _: () = redis::cmd("DEL")
        .arg(keys.search_indexes())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(app.store.index_existing().await.unwrap(), 6);
    assert_eq!(search(None).await, ids);
    assert_eq!(
        search(Some(vec![runbridge::domain::State::Pending])).await,
        ids[2..].to_vec()
    );
    assert_eq!(
        search(Some(vec![runbridge::domain::State::Resolved])).await,
        ids[..2].to_vec()
    );
    // Once per deployment: the second start indexes nothing.
    assert_eq!(app.store.index_existing().await.unwrap(), 0);
    app.stop().await;
}

/// What one operation did, in nanoseconds from the test's start: when it
/// was sent and when its answer came (`None`: still in flight).
#[derive(Debug, Clone, Copy)]
struct Span {
    sent: u128,
    answered: Option<u128>,
}

/// The history of one promise: its create, and its settle if any.
#[derive(Debug, Clone, Copy)]
struct Life {
    create: Span,
    settle: Option<Span>,
}

/// The window of moments at which a page's answer could have held, given
/// the history: empty (`lo > hi`) when no single moment explains it. A
/// listed promise was created by then (its create was sent), listed
/// settled only if its settle was sent, listed pending only if no settle
/// had been answered; a promise left out, where the page `covers` it, was
/// not created yet (its create not answered).
fn moment_window(
    search: Span,
    page: &BTreeMap<String, String>,
    lives: &BTreeMap<String, Life>,
    covers: impl Fn(&str) -> bool,
) -> Result<(u128, u128), String> {
    let (mut lo, mut hi) = (search.sent, search.answered.unwrap_or(u128::MAX));
    for (id, life) in lives {
        match page.get(id).map(String::as_str) {
            None if !covers(id) => {}
            None => hi = hi.min(life.create.answered.unwrap_or(u128::MAX)),
            Some("PENDING") => {
                lo = lo.max(life.create.sent);
                if let Some(s) = life.settle {
                    hi = hi.min(s.answered.unwrap_or(u128::MAX));
                }
            }
            Some(state) => match life.settle {
                Some(s) => lo = lo.max(s.sent).max(life.create.sent),
                None => return Err(format!("{id} listed {state}, never settled")),
            },
        }
    }
    for id in page.keys() {
        if !lives.contains_key(id) {
            return Err(format!("{id} listed, never created"));
        }
    }
    Ok((lo, hi))
}

/// The partition a page's cursor stops in (`None`: the page is the whole
/// search). The cursor is opaque to clients; this test reads it to know
/// which partitions the page answered for: every one before it.
fn stopped_in(cursor: Option<&str>) -> Option<u32> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor?)
        .expect("a cursor of this version");
    let raw = String::from_utf8(raw).unwrap();
    Some(raw.split(':').nth(1).unwrap().parse().unwrap())
}

/// A search page answers for one moment, across partitions: while three
/// tasks create promises (spread over 16 partitions by their ids) and
/// settle every third, each search of one page (every promise of the test
/// fits on it) is checked against the recorded history: some moment within
/// the search must explain exactly what it listed, with the states it
/// showed, and what it left out in the partitions it answered for (all, or
/// those before its cursor when writes kept landing). A page read partition
/// by partition, each at its own moment, lists a promise created after
/// another it leaves out.
#[tokio::test]
async fn a_search_page_answers_for_one_moment_across_partitions() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![("redis.partitions", "16".into())],
        ..Default::default()
    })
    .await;
    let tag = app.name.clone();
    let start = std::time::Instant::now();
    let now = move || start.elapsed().as_nanos();
    let lives: Arc<Mutex<BTreeMap<String, Life>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let writer = |w: usize| {
        let (lives, done, app, tag) = (lives.clone(), done.clone(), &app, tag.clone());
        async move {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) && n < 300 {
                let id = format!("{tag}-w{w}-{n}");
                let sent = now();
                lives.lock().await.insert(
                    id.clone(),
                    Life {
                        create: Span {
                            sent,
                            answered: None,
                        },
                        settle: None,
                    },
                );
                let r = app
                    .operator(app.http.post(format!("{}/promises", app.sidecar_url)))
                    .json(&json!({"id": id, "tags": {"t": tag}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                let answered = now();
                lives.lock().await.get_mut(&id).unwrap().create.answered = Some(answered);
                if n % 3 == 0 {
                    let sent = now();
                    lives.lock().await.get_mut(&id).unwrap().settle = Some(Span {
                        sent,
                        answered: None,
                    });
                    let r = app
                        .operator(app.http.patch(format!("{}/promises/{id}", app.sidecar_url)))
                        .json(&json!({"state": "RESOLVED", "value": {"headers": {}, "data": "\"ok\""}}))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success());
                    let answered = now();
                    lives.lock().await.get_mut(&id).unwrap().settle = Some(Span {
                        sent,
                        answered: Some(answered),
                    });
                }
                n += 1;
            }
        }
    };
    let keys = app.settings.keys().unwrap();
    let searcher = async {
        let (mut whole, mut partial) = (0, 0);
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < until {
            let sent = now();
            let r = app
                .operator(app.http.get(format!(
                    "{}/promises?tags[t]={tag}&limit=1000",
                    app.sidecar_url
                )))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            let answered = now();
            let stop = stopped_in(v["cursor"].as_str());
            let covers =
                |id: &str| stop.is_none_or(|p| keys.partition(&PromiseId::parse(id).unwrap()) < p);
            let page: BTreeMap<String, String> = v["promises"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["id"].as_str().unwrap().to_owned(),
                        p["state"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            let lives = lives.lock().await.clone();
            let search = Span {
                sent,
                answered: Some(answered),
            };
            let n = whole + partial;
            match moment_window(search, &page, &lives, covers) {
                Ok((lo, hi)) => assert!(
                    lo <= hi,
                    "search #{n} ({} listed, cursor in partition {stop:?}) is no single moment: it needs a moment after {lo} ns and before {hi} ns",
                    page.len()
                ),
                Err(e) => panic!("search #{n}: {e}"),
            }
            if stop.is_some() {
                partial += 1;
            } else {
                whole += 1;
            }
        }
        done.store(true, Ordering::Relaxed);
        (whole, partial)
    };
    let (_, _, _, (whole, partial)) = tokio::join!(writer(0), writer(1), writer(2), searcher);
    let created = lives.lock().await.len();
    eprintln!("{whole} whole pages and {partial} cut short checked, over {created} promises");
    assert!(
        whole + partial >= 10 && created >= 60,
        "too little happened to show anything"
    );
    app.stop().await;
}
