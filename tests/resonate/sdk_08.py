"""Resonate's Python SDK of the current line (resonate-sdk 0.8, pinned in
the Makefile) against the sidecar's protocol endpoint, built as the SDK's
own Resonate builds it (HttpConnection -> Transport -> Sender -> Promises):
create, create again with another parameter, get an unknown id, reject a
resolved promise, search. Driven by tests/it/resonate.rs, which passes
SIDECAR_URL, TOKEN (an operator token) and ID, and checks the store and the
events afterwards. Prints one line per step and "ok" at the end.
"""

import asyncio
import os
import time

from resonate.codec import Codec, NoopEncryptor
from resonate.connections import HttpConnection
from resonate.error import ServerError
from resonate.promises import Promises
from resonate.send import Sender
from resonate.transport import Transport
from resonate.types import Value

url = os.environ["SIDECAR_URL"]
token = os.environ["TOKEN"]
pid = os.environ["ID"]


def step(name, value):
    print(f"{name}: {value}", flush=True)


async def main():
    net = HttpConnection(url=url, auth=token)
    await net.start()
    try:
        promises = Promises(Sender(Transport(net), token), Codec(NoopEncryptor()))
        timeout_at = int(time.time() * 1000) + 600_000
        tags = {"suite": "resonate-py08"}
        created = await promises.create(pid, timeout_at, Value(data={"n": 1}), tags)
        step("create", created.state)
        assert created.id == pid and created.state == "pending", created
        assert created.param.data == {"n": 1}, created.param

        # The protocol's create is idempotent: the promise as it is.
        again = await promises.create(pid, timeout_at, Value(data={"n": 2}), tags)
        step("create again", again.state)
        assert again.param.data == {"n": 1} and again.created_at == created.created_at, again

        try:
            await promises.get(f"{pid}-missing")
            raise AssertionError("get unknown: no error")
        except ServerError as e:
            step("get unknown", e)
            assert e.code == 404, e

        found = await promises.search("pending", tags, 100, None)
        step("search", [p.id for p in found.promises])
        assert pid in [p.id for p in found.promises]

        resolved = await promises.resolve(pid, Value(data="done"))
        step("resolve", resolved.state)
        assert resolved.state == "resolved" and resolved.value.data == "done", resolved

        # A settle of a settled promise answers it as it is.
        late = await promises.reject(pid, Value(data="late"))
        step("reject a resolved promise", late.state)
        assert late.state == "resolved" and late.value.data == "done", late
    finally:
        await net.stop()
    print("ok")


asyncio.run(main())
