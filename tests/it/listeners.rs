//! What the address the workspace reaches offers, and what the console's
//! login lets a guesser do.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::COOKIE;

use crate::helpers::*;
use crate::metrics::{scrape, value};

/// With `sidecar.operator_listen`, the sidecar's own listener (the one an
/// Ingress publishes) serves only what a notebook and Databricks need, and
/// the health checks: the promise API, the console, Resonate's protocol,
/// metrics and the OpenAPI document are on the operator listener alone.
/// A run still settles through the public one.
#[tokio::test]
async fn operator_routes_are_off_the_notebook_listener() {
    let port = runbridge_testkit::free_port();
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![("sidecar.operator_listen", format!("127.0.0.1:{port}"))],
        ..Default::default()
    })
    .await;
    let operator = format!("http://127.0.0.1:{port}");
    let public = app.sidecar_url.clone();
    let status = |r: reqwest::RequestBuilder| async move { r.send().await.unwrap().status() };
    let id = unique("split");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(ev["data"]["state"], "RESOLVED", "settled through {public}");

    for (method, path) in [
        ("GET", "/ui"),
        ("GET", "/ui/login"),
        ("GET", "/promises"),
        ("GET", "/promises/x"),
        ("POST", "/promises/cancel"),
        ("POST", "/"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ] {
        let r = app.operator(
            app.http
                .request(method.parse().unwrap(), format!("{public}{path}")),
        );
        assert_eq!(
            status(r).await,
            StatusCode::NOT_FOUND,
            "{method} {path} on {public}"
        );
    }
    let p = app.promise(&id).await.unwrap();
    let signer = signer_of(LOCAL_CALLBACK_SECRET);
    let token = p.callback_token(&signer);
    let read = app
        .http
        .get(format!("{public}/cb/{}/promises/{id}", token.expose()));
    assert_eq!(status(read).await, StatusCode::OK, "a notebook's read");
    assert_eq!(
        status(app.http.get(format!("{public}/healthz"))).await,
        StatusCode::OK
    );

    let search = app.operator(app.http.get(format!("{operator}/promises?id={id}")));
    assert_eq!(status(search).await, StatusCode::OK);
    assert_eq!(
        status(app.http.get(format!("{operator}/ui/login"))).await,
        StatusCode::UNAUTHORIZED,
        "the login form"
    );
    assert_eq!(
        status(app.http.get(format!("{operator}/metrics"))).await,
        StatusCode::OK
    );
    let resolve = app
        .http
        .post(format!("{operator}/cb/{}/resolve?id={id}", token.expose()));
    assert_eq!(
        status(resolve).await,
        StatusCode::NOT_FOUND,
        "callbacks on the operator listener"
    );
    app.stop().await;
}

/// The console's login form, from `client` (a loopback address of its
/// own): its answer's status after a try with `token`.
async fn try_login(app: &TestApp, client: &str, token: &str) -> (StatusCode, Option<String>) {
    let http = reqwest::Client::builder()
        .local_address(client.parse::<IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (set, csrf) = crate::ui::login_form_from(&http, app).await;
    let cookie = set.split(';').next().unwrap().to_owned();
    let r = http
        .post(format!("{}/ui/login", app.sidecar_url))
        .header(COOKIE, cookie)
        .form(&[("csrf", csrf.as_str()), ("token", token)])
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status(), retry)
}

/// Failed console logins are limited per client address and in all: past
/// `sidecar.login_failures_per_client` an address is refused (429, even
/// with the right token) while others still log in; past
/// `sidecar.login_failures_overall` everyone is. Both are counted.
#[tokio::test]
async fn failed_logins_are_limited_per_client_and_in_all() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![
            ("sidecar.login_failures_per_client", "3".into()),
            ("sidecar.login_failures_overall", "5".into()),
        ],
        ..Default::default()
    })
    .await;
    let before = scrape(&app).await;
    let right = app.operator_token.clone();
    let wrong = "not-the-operator-token-0123456789";
    for i in 0..3 {
        let (s, _) = try_login(&app, "127.0.0.1", wrong).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    let (s, retry) = try_login(&app, "127.0.0.1", &right).await;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "a fourth try from the guesser"
    );
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s > 0)));
    assert_eq!(
        try_login(&app, "127.0.0.2", &right).await.0,
        StatusCode::SEE_OTHER,
        "another address logs in"
    );
    for _ in 0..2 {
        assert_eq!(
            try_login(&app, "127.0.0.2", wrong).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        try_login(&app, "127.0.0.3", &right).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "five failures in all: everyone waits"
    );
    let after = scrape(&app).await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(grew("runbridge_console_login_failures_total", &[]), 5.0);
    assert!(
        grew(
            "runbridge_console_logins_refused_total",
            &[("scope", "client")]
        ) >= 1.0
    );
    assert!(
        grew(
            "runbridge_console_logins_refused_total",
            &[("scope", "overall")]
        ) >= 1.0
    );
    app.stop().await;
}
