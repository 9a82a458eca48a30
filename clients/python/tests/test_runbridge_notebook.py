"""The notebook helper against a real `runbridge sidecar` (and Redis).

The sidecar runs from target/debug (built by `make test` before this runs),
with a Redis key prefix and broker names of its own. Promises are created
through the operator API; callback tokens are signed here with the local
development secret exactly as the worker signs them: HMAC-SHA256 of
"v2\0" + id + "\0" + the promise's creation time (ms), base64url, written
"v2.<created>.<mac>", so a token opens one incarnation of an id.
"""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "clients" / "python"))
sys.path.insert(0, str(ROOT / "tests" / "python"))
import runbridge_notebook as rb  # noqa: E402
from runbridge_stack import binary, free_port, wait_http  # noqa: E402

SECRET = b"local-dev-callback-secret-0123456789abcdef"  # config/local.toml
OPERATOR = "local-dev-operator-token"


@pytest.fixture(scope="module")
def sidecar():
    port = free_port()
    tag = f"pytest-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        RUNBRIDGE_ENV="local",
        RUNBRIDGE_CONFIG_DIR=str(ROOT / "config"),
        RUNBRIDGE__SIDECAR__LISTEN=f"127.0.0.1:{port}",
        RUNBRIDGE__REDIS__KEY_PREFIX=tag,
        RUNBRIDGE__AMQP__TRIGGERS_QUEUE=f"{tag}.triggers",
        RUNBRIDGE__AMQP__CONTROL_QUEUE=f"{tag}.control",
        RUST_LOG="warn",
    )
    proc = subprocess.Popen([str(binary()), "sidecar"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/healthz", proc, "the sidecar", seconds=20)
    yield base, tag
    proc.terminate()
    proc.wait(timeout=30)


def token(promise_id, created_on):
    msg = b"v2\0" + promise_id.encode() + b"\0" + str(created_on).encode()
    mac = hmac.new(SECRET, msg, hashlib.sha256).digest()
    return f"v2.{created_on}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def operator(base, method, path, body=None):
    req = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def new_promise(sidecar, **extra):
    base, tag = sidecar
    pid = f"{tag}-{uuid.uuid4().hex[:10]}"
    created = operator(base, "POST", "/promises", dict({"id": pid}, **extra))["createdOn"]
    t = token(pid, created)
    return rb.Params(pid, f"{base}/cb/{t}", t)


def state(sidecar, p):
    return operator(sidecar[0], "GET", f"/promises/{p.promise_id}")


def test_params_from_widgets_then_argv_then_env():
    class Widgets:
        def get(self, name):
            if name == "promise_id":
                return "from-widget"
            raise ValueError("no such widget")

    class DBUtils:
        widgets = Widgets()

    p = rb.params(
        dbutils=DBUtils(),
        argv=["--url=http://x/cb/t", "--callback_token", "v1.abc"],
        environ={"RUNBRIDGE_PROMISE_ID": "from-env"},
    )
    assert (p.promise_id, p.url, p.callback_token) == ("from-widget", "http://x/cb/t", "v1.abc")
    assert "cb/t" not in repr(p)
    with pytest.raises(rb.CallbackError, match="promise_id, url"):
        rb.params(argv=[], environ={})


def test_resolve_and_repeat_is_deduplicated(sidecar):
    p = new_promise(sidecar)
    r = rb.resolve({"rows": 3}, p)
    assert r["state"] == "RESOLVED" and r["deduplicated"] is False
    again = rb.resolve({"rows": 3}, p)
    assert again["deduplicated"] is True
    got = state(sidecar, p)
    assert got["state"] == "RESOLVED"
    assert json.loads(got["value"]["data"]) == {"rows": 3}


def test_reject_after_resolve_is_a_clear_error(sidecar):
    p = new_promise(sidecar)
    rb.resolve("done", p)
    with pytest.raises(rb.AlreadySettled) as e:
        rb.reject("too late", p)
    assert e.value.status == 403
    assert e.value.state == "RESOLVED"
    assert state(sidecar, p)["state"] == "RESOLVED"


def test_context_manager_resolves_with_value(sidecar):
    p = new_promise(sidecar)
    with rb.promise(p=p) as run:
        run.value = "hello world"
    got = state(sidecar, p)
    assert got["state"] == "RESOLVED" and got["value"]["data"] == "hello world"


def test_context_manager_rejects_with_traceback_and_reraises(sidecar):
    p = new_promise(sidecar)
    with pytest.raises(ZeroDivisionError):
        with rb.promise(p=p):
            1 / 0
    got = state(sidecar, p)
    assert got["state"] == "REJECTED"
    err = json.loads(got["value"]["data"])
    assert err["type"] == "ZeroDivisionError"
    assert "division by zero" in err["message"]
    assert "Traceback" in err["traceback"]


def test_context_manager_heartbeats_in_the_background(sidecar):
    p = new_promise(sidecar)
    beats = []
    real = rb.heartbeat

    def counting(p_):
        beats.append(real(p_))
        return beats[-1]

    rb.heartbeat = counting
    try:
        with rb.promise(p=p, heartbeat_seconds=0.2) as run:
            time.sleep(1.0)
            run.value = "ok"
    finally:
        rb.heartbeat = real
    assert len(beats) >= 3, beats
    assert all(b["state"] == "PENDING" for b in beats)
    assert state(sidecar, p)["state"] == "RESOLVED"


def test_progress_is_stored_rate_limited_and_refused_when_bad(sidecar):
    p = new_promise(sidecar)
    with rb.promise(p=p) as run:
        first = run.progress(25, "extract", rows=10)
        assert first is not None and first["seq"] == 1
        assert run.progress(50, "extract") is None, "within min_interval: skipped"
        forced = rb.progress(75, "load", message="almost", p=p, force=True, rows=30)
        assert forced["seq"] == 2
        with pytest.raises(rb.CallbackError) as e:
            rb.progress(140, p=p, force=True)
        assert e.value.status == 400
        got = state(sidecar, p)
        assert got["progress"]["percent"] == 75.0
        assert got["progress"]["stage"] == "load"
        assert got["progress"]["metrics"] == {"rows": 30.0}
        assert [u["seq"] for u in got["progressHistory"]] == [1, 2]
        run.value = "ok"
    with pytest.raises(rb.AlreadySettled):
        rb.progress(100, p=p, force=True)


def test_final_error_rejects_and_reraises(sidecar):
    p = new_promise(sidecar)
    with pytest.raises(rb.FinalError):
        with rb.promise(p=p):
            raise rb.FinalError("no source data")
    got = state(sidecar, p)
    assert got["state"] == "REJECTED"
    assert json.loads(got["value"]["data"])["type"] == "FinalError"


def test_wrong_token_is_refused_and_changes_nothing(sidecar):
    p = new_promise(sidecar)
    # Signed right for the same creation time, but for another id.
    created = int(p.callback_token.split(".")[1])
    bad = rb.Params(p.promise_id, p.url.rsplit("/", 1)[0] + "/" + token("another-id", created))
    with pytest.raises(rb.CallbackError) as e:
        rb.resolve("x", bad)
    assert e.value.status == 401
    assert state(sidecar, p)["state"] == "PENDING"


def test_retries_5xx_and_connection_errors_then_succeeds():
    # A stand-in sidecar: 503 twice, then 200. The helper retries through it.
    import http.server
    import threading

    calls = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if len(calls) <= 2:
                self.send_response(503)
                self.end_headers()
                self.wfile.write(b'{"error":{"code":"store_unavailable"}}')
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"state":"RESOLVED","deduplicated":false}')

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        p = rb.Params("p1", f"http://127.0.0.1:{srv.server_port}/cb/v1.x")
        r = rb._post(p, "resolve", {"value": "x"}, retries=4, backoff=0.01)
        assert r["state"] == "RESOLVED"
        assert len(calls) == 3 and all(c.startswith("/cb/v1.x/resolve?id=p1") for c in calls)
    finally:
        srv.shutdown()
    # Nothing listening at all: a clear error after the retries.
    dead = rb.Params("p1", f"http://127.0.0.1:{free_port()}/cb/v1.x")
    with pytest.raises(rb.CallbackError, match="resolve"):
        rb._post(dead, "resolve", {"value": "x"}, retries=2, backoff=0.01)
