"""Resonate's Python SDK of the classic line (resonate-sdk 0.6, pinned in
the Makefile) against the sidecar's Durable Promise routes, as a user would
point its RemoteStore at a Resonate server: create, create again with
another idempotency key, get an unknown id, reject a resolved promise, and a
search through the store's own request path. Every refusal must reach the
caller as the SDK's ResonateStoreError with Resonate's numeric code (the SDK
builds its code as the float 100.<code>, so a code that is not a number
crashes it). Driven by tests/it/resonate.rs, which passes SIDECAR_URL,
TOKEN (an operator token) and ID, and checks the store and the events
afterwards. Prints one line per step and "ok" at the end.
"""

import json
import os
import sys
import time
from urllib.parse import urlsplit

from requests import Request
from resonate.errors import ResonateStoreError
from resonate.retry_policies import Never
from resonate.stores.remote import RemoteStore

url = urlsplit(os.environ["SIDECAR_URL"])
pid = os.environ["ID"]
store = RemoteStore(
    host=f"{url.scheme}://{url.hostname}",
    port=str(url.port),
    auth=("runbridge", os.environ["TOKEN"]),
    retry_policy=Never(),
)
promises = store.promises


def step(name, value):
    print(f"{name}: {value}", flush=True)


def refused(name, call, code):
    try:
        call()
    except ResonateStoreError as e:
        step(name, f"{e.code} {e.mesg}")
        assert e.code == float(f"100.{code}"), (name, e.code)
        return e
    raise AssertionError(f"{name}: no error")


timeout = int(time.time() * 1000) + 600_000
created = promises.create(pid, timeout, ikey="first", tags={"suite": "resonate-py06"}, data='{"n": 1}')
step("create", created.state)
assert created.id == pid and created.state == "PENDING"
assert created.param.data == '{"n": 1}'

again = promises.create(pid, timeout, ikey="first", tags={"suite": "resonate-py06"}, data='{"n": 1}')
step("create again, same key", again.state)
assert again.id == pid and again.created_on == created.created_on

refused(
    "create again, another key",
    lambda: promises.create(pid, timeout, ikey="second", tags={"suite": "resonate-py06"}),
    409,
)
refused("get unknown", lambda: promises.get(f"{pid}-missing"), 404)

got = promises.get(pid)
step("get", got.state)
assert got.state == "PENDING"

found = store.call(Request("get", f"{store.url}/promises", params={"id": pid, "state": "pending"}).prepare())
step("search", [p["id"] for p in found["promises"]])
assert [p["id"] for p in found["promises"]] == [pid]

resolved = promises.resolve(pid, ikey="done", data='"done"')
step("resolve", resolved.state)
assert resolved.state == "RESOLVED" and resolved.value.data == '"done"'

e = refused("reject a resolved promise", lambda: promises.reject(pid, ikey="late", data='"late"'), 403)
assert "RESOLVED" in e.mesg, e.mesg
assert promises.get(pid).state == "RESOLVED"

print("ok")
sys.exit(0)
