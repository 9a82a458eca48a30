//! What one connection, or one client address, may hold of the sidecar:
//! each test names the way a client would otherwise keep others out.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;

use crate::helpers::*;

fn sidecar_addr(app: &TestApp) -> String {
    app.sidecar_url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_owned()
}

/// Has the server closed this connection? Waits up to `limit` for EOF or
/// a reset; `false` if it is still open then.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A response (a 408, say) may come first; then the close.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Opens `n` connections that send nothing: those still open, and how
/// many the sidecar closed at once (within 500 ms).
async fn hold_idle(app: &TestApp, n: usize) -> (Vec<tokio::net::TcpStream>, usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(
            tokio::net::TcpStream::connect(sidecar_addr(app))
                .await
                .unwrap(),
        );
    }
    let mut open = Vec::new();
    for mut s in held {
        if !closed_within(&mut s, Duration::from_millis(500)).await {
            open.push(s);
        }
    }
    let refused = n - open.len();
    (open, refused)
}

/// A client trickling its request head one byte at a time is cut off once
/// `sidecar.header_timeout_ms` has passed, and so is a kept-alive
/// connection that sends nothing more.
#[tokio::test]
async fn a_trickling_header_connection_is_closed_within_the_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![("sidecar.header_timeout_ms", "1000".into())],
        ..Default::default()
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(sidecar_addr(&app))
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let opened = tokio::time::Instant::now();
    let mut closed = false;
    // One byte every 200 ms for up to 10 s (ten times the timeout).
    for _ in 0..50 {
        if s.write_all(b"a").await.is_err()
            || closed_within(&mut s, Duration::from_millis(200)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "still open after 10 s of trickling");
    let took = opened.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "closed only after {took:?} (timeout 1 s)"
    );

    // Kept alive after one request, then silent.
    let mut s = tokio::net::TcpStream::connect(sidecar_addr(&app))
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(6)).await,
        "an idle kept-alive connection stayed open"
    );
    app.stop().await;
}

/// Past `sidecar.max_connections`, one more connection is closed at once;
/// once connections end, new ones are served again.
#[tokio::test]
async fn connections_past_the_limit_are_closed() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![
            ("sidecar.max_connections", "3".into()),
            ("sidecar.header_timeout_ms", "30000".into()),
        ],
        ..Default::default()
    })
    .await;
    // At most 3 are served (one may be the test client's pooled one), so
    // at least one of the 4 idle ones is closed long before the 30 s
    // header timeout.
    let (held, refused) = hold_idle(&app, 4).await;
    assert!(
        refused >= 1,
        "4 idle connections all held open past a limit of 3"
    );
    drop(held);
    let url = format!("{}/healthz", app.sidecar_url);
    eventually(Duration::from_secs(10), "served again", || async {
        reqwest::get(&url)
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    app.stop().await;
}

/// An HTTP/2 connection over plain TCP (prior knowledge), driven in the
/// background: hyper answers the server's pings and settings, as the
/// attacker's client did. The handle finishes when the server closes it.
async fn h2c(addr: &str) -> Result<(SendRequest<Empty<Bytes>>, JoinHandle<()>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    let driving = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, driving))
}

/// GET `path` on an HTTP/2 connection: the status and body.
async fn h2_get(
    send: &mut SendRequest<Empty<Bytes>>,
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Bytes), String> {
    let mut req = hyper::Request::get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = send
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes()))
}

/// Twenty HTTP/2 connections that each made one request and then only
/// answer pings held every slot of `max_connections = 20`, and nobody else
/// was served. Now a connection with no request in flight for the idle time
/// is closed, so new requests are served within a few idle times; a
/// long-poll, which is a request in flight, is not cut.
#[tokio::test]
async fn idle_http2_connections_are_closed_and_free_their_slots() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![
            ("sidecar.allow_h2c", "true".into()),
            ("sidecar.max_connections", "20".into()),
            ("sidecar.max_connections_per_client", "20".into()),
            ("sidecar.header_timeout_ms", "1000".into()),
        ],
        ..Default::default()
    })
    .await;
    let addr = sidecar_addr(&app);
    let mut idle = Vec::new();
    for i in 0..20 {
        // A slot may still be held by the set-up's own kept-alive
        // connection for up to the idle time.
        let held = eventually(
            Duration::from_secs(10),
            &format!("h2 connection {i}"),
            || async {
                let (mut send, driving) = h2c(&addr).await.ok()?;
                let (status, _) = h2_get(&mut send, &addr, "/healthz", None).await.ok()?;
                (status == 200).then_some((send, driving))
            },
        )
        .await;
        idle.push(held);
    }
    let url = format!("{}/healthz", app.sidecar_url);
    eventually(
        Duration::from_secs(10),
        "a new client served past 20 idle h2 connections",
        || async {
            let fresh = reqwest::Client::new();
            fresh
                .get(&url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "every idle h2 connection closed",
        || async {
            idle.iter()
                .all(|(_, driving)| driving.is_finished())
                .then_some(())
        },
    )
    .await;

    // A long-poll of three idle times on an h2 connection is answered.
    let id = unique("h2-wait");
    app.create_promise(&id).await;
    let (mut send, _driving) = h2c(&addr).await.expect("h2c");
    let (status, body) = h2_get(
        &mut send,
        &addr,
        &format!("/promises/{id}?wait=3s"),
        Some(&app.operator_token),
    )
    .await
    .expect("the long-poll is answered, not cut");
    assert_eq!(status, 200, "{body:?}");
    app.stop().await;
}

/// Plain HTTP speaks HTTP/1.1 only unless `sidecar.allow_h2c`: HTTP/2 is
/// offered over HTTPS, by ALPN.
#[tokio::test]
async fn plain_http_refuses_http2_unless_allowed() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let addr = sidecar_addr(&app);
    let answered = match h2c(&addr).await {
        Ok((mut send, _driving)) => h2_get(&mut send, &addr, "/healthz", None).await.is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "an h2c request was served by default");
    let r = reqwest::get(format!("{}/healthz", app.sidecar_url))
        .await
        .expect("HTTP/1.1");
    assert!(r.status().is_success());
    app.stop().await;
}

/// One client address may hold more than its share
/// (`sidecar.max_connections_per_client`) only while a share of the slots
/// stays free for others: then the next connection from it is closed at
/// once, while another address is still served.
#[tokio::test]
async fn one_client_address_cannot_take_the_last_slots() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![
            ("sidecar.max_connections", "9".into()),
            ("sidecar.max_connections_per_client", "3".into()),
            ("sidecar.header_timeout_ms", "30000".into()),
        ],
        ..Default::default()
    })
    .await;
    // Past its share of 3 while a share stays free: served (the set-up's
    // own kept-alive connection, if any, is one more of this address's).
    let (mut held, refused) = hold_idle(&app, 4).await;
    assert_eq!(refused, 0, "refused with slots to spare");
    // Three more would leave fewer than a share free: one at least is closed.
    let (more, refused) = hold_idle(&app, 3).await;
    held.extend(more);
    assert!(
        refused >= 1,
        "one address took the last slots of 9 past its share of 3"
    );
    // Another client (a loopback address of its own) is served meanwhile.
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let client = reqwest::Client::builder()
        .local_address(other)
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/healthz", app.sidecar_url))
        .send()
        .await
        .expect("another address is served");
    assert!(r.status().is_success());
    app.stop().await;
}
