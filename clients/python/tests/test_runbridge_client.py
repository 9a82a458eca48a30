"""The producer client against the real stack: RabbitMQ and Redis of this
machine, `runbridge all` and `runbridge emulate` from target/debug.

Everything runs in a RabbitMQ vhost of this module's own, so the test that
drops the broker's connections drops only those (runbridge's included:
they reconnect too).
"""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pika
import pika.exceptions
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "clients" / "python" / "producer"))
sys.path.insert(0, str(ROOT / "tests" / "python"))
from runbridge_stack import running  # noqa: E402
from runbridge_client import Client, Event, EventConsumer, EventData, Rejected, RunTimeout, Seen, Trigger  # noqa: E402
from runbridge_client.aio import AsyncClient  # noqa: E402
from runbridge_client.client import reply_queue  # noqa: E402

OK_JOB, FAIL_JOB, SLOW_JOB = 101, 103, 105


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def stack():
    tag = f"pyclient-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", tag)
    rabbitmqctl("set_permissions", "-p", tag, "guest", ".*", ".*", ".*")
    url = f"amqp://guest:guest@127.0.0.1:5672/{tag}"
    settings = {
        "RUNBRIDGE__AMQP__URL": url,
        "RUNBRIDGE__REDIS__KEY_PREFIX": tag,
        "DATABRICKS_TOKEN": "dapi-pytest",
    }
    jobs = [f"{OK_JOB}:callback:300:42", f"{FAIL_JOB}:fail:300", f"{SLOW_JOB}:callback:5000:42"]
    try:
        with running(settings, [a for j in jobs for a in ("--job", j)]) as s:
            # A deployment has consumers of its events: runbridge keeps an
            # event that no queue would receive (and its reply) in the
            # outbox until one is bound.
            conn = pika.BlockingConnection(pika.URLParameters(url))
            ch = conn.channel()
            ch.queue_declare(queue="pytest.all-events", durable=True)
            ch.queue_bind(queue="pytest.all-events", exchange="runbridge.events", routing_key="promise.#")
            conn.close()
            yield url, s.emulator
    finally:
        rabbitmqctl("delete_vhost", tag)


def runs_of(emulator, job_id, promise_id):
    req = urllib.request.Request(
        f"{emulator}/api/2.2/jobs/runs/list?job_id={job_id}&limit=25",
        headers={"Authorization": "Bearer dapi-pytest"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        runs = json.loads(r.read()).get("runs", [])
    return [
        r for r in runs
        if any(p.get("name") == "promise_id" and p.get("value") == promise_id for p in r.get("job_parameters", []))
    ]


def reply_queue_exists(url, promise_id):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(queue=reply_queue(promise_id), passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404
        return False
    finally:
        if conn.is_open:
            conn.close()


def test_run_returns_the_resolved_value(stack):
    url, _ = stack
    with Client(url) as rb:
        assert rb.run(OK_JOB, {"date": "2026-11-30"}, timeout=60) == 42


def test_run_raises_the_rejection(stack):
    url, _ = stack
    t = Trigger(job_id=FAIL_JOB, job_parameters={})
    with Client(url) as rb, pytest.raises(Rejected) as e:
        rb.run(trigger=t, timeout=60)
    assert e.value.event.data.promise_id == t.id
    assert e.value.event.data.state.startswith("REJECTED")
    assert e.value.event.data.error


def test_run_times_out_cleanly(stack):
    url, _ = stack
    t = Trigger(job_id=SLOW_JOB, job_parameters={})
    started = time.monotonic()
    with Client(url) as rb, pytest.raises(RunTimeout) as e:
        rb.run(trigger=t, timeout=1)
    assert e.value.promise_id == t.id
    assert time.monotonic() - started < 10
    # Its reply queue is gone, and the client still works.
    assert not reply_queue_exists(url, t.id)
    with Client(url) as rb:
        assert rb.run(OK_JOB, {}, timeout=60) == 42


def test_run_survives_a_broker_connection_drop_during_the_wait(stack):
    url, emulator = stack
    vhost = url.rsplit("/", 1)[1]
    t = Trigger(job_id=SLOW_JOB, job_parameters={})

    def drop():
        time.sleep(1.5)  # the run takes 5 s: the client is waiting by now
        rabbitmqctl("close_all_connections", "--vhost", vhost, "pytest: a dropped connection")

    dropper = threading.Thread(target=drop)
    dropper.start()
    with Client(url) as rb:
        assert rb.run(trigger=t, timeout=90) == 42
    dropper.join()
    assert len(runs_of(emulator, SLOW_JOB, t.id)) == 1


def test_publish_is_confirmed_and_idempotent(stack):
    url, emulator = stack
    t = Trigger(job_id=OK_JOB, job_parameters={"n": "1"})
    with Client(url) as rb:
        assert rb.publish(t) == t.id
        assert rb.publish(t) == t.id  # a repeat after a lost confirm, say
    deadline = time.time() + 30
    while time.time() < deadline and not runs_of(emulator, OK_JOB, t.id):
        time.sleep(0.2)
    time.sleep(1)
    assert len(runs_of(emulator, OK_JOB, t.id)) == 1


def test_publish_to_a_missing_queue_is_an_error(stack):
    url, _ = stack
    with Client(url, triggers_queue="no-such-queue", reconnect_seconds=2) as rb:
        with pytest.raises(pika.exceptions.UnroutableError):
            rb.publish(Trigger(job_id=OK_JOB))


def test_the_models_match_the_schemas(stack):
    url, _ = stack
    trigger_schema = json.loads((ROOT / "docs/schemas/trigger.schema.json").read_text())
    event_schema = json.loads((ROOT / "docs/schemas/event.schema.json").read_text())
    for t in (
        Trigger(job_id=1, job_parameters={"a": "b"}, tags={"team": "x"}, timeout_seconds=60),
        Trigger(job_id=1, for_each=[{"d": "1"}, {"d": "2"}], join="all", max_concurrency=1),
        Trigger(submit={"run_name": "x", "tasks": []}),
    ):
        jsonschema.validate(t.to_dict(), trigger_schema)
    with pytest.raises(ValueError):
        Trigger(job_parameters={})  # no job
    # Every property the schemas define has a field.
    assert set(event_schema["properties"]) <= set(Event.__dataclass_fields__)
    assert set(event_schema["$defs"]["EventData"]["properties"]) <= set(EventData.__dataclass_fields__)
    # A real event validates and parses.
    got = []
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    q = ch.queue_declare(queue="", exclusive=True).method.queue
    ch.queue_bind(queue=q, exchange="runbridge.events", routing_key="promise.#")
    with Client(url) as rb:
        t = Trigger(job_id=OK_JOB)
        rb.run(trigger=t, timeout=60)
    for method, _p, body in ch.consume(q, auto_ack=True, inactivity_timeout=10):
        if method is None:
            break
        if json.loads(body)["data"]["promise_id"] == t.id:
            got.append(body)
            break
    conn.close()
    assert got, "the event reached the exchange"
    jsonschema.validate(json.loads(got[0]), event_schema)
    assert Event.from_json(got[0]).data.value == 42


def test_the_event_consumer_hands_each_event_over_once(stack):
    url, _ = stack
    queue = f"pytest.events.{uuid.uuid4().hex[:8]}"
    consumer = EventConsumer(url, queue, binding="promise.resolved")
    assert consumer.run(lambda e: None, max_idle=0.5) == 0  # declares and binds
    with Client(url) as rb:
        t = Trigger(job_id=OK_JOB)
        rb.run(trigger=t, timeout=60)
    # The same event again, as after a lost confirm: same id.
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    body = None
    for method, _p, b in ch.consume(queue, inactivity_timeout=10):
        if method is None:
            break
        body = b
        ch.basic_nack(method.delivery_tag, requeue=True)
        break
    ch.cancel()
    assert body is not None
    ch.basic_publish(exchange="runbridge.events", routing_key="promise.resolved", body=body)
    conn.close()
    handled = []
    assert consumer.run(handled.append, max_idle=2) == 1
    assert [e.data.promise_id for e in handled] == [t.id]
    seen = Seen(remember=2)
    assert [seen.first_time(i) for i in "abab"] == [True, True, False, False]
    seen.first_time("c")
    assert seen.first_time("a")  # forgotten: only the last two are kept


def test_the_async_client_runs_and_raises(stack):
    url, _ = stack

    async def main():
        async with AsyncClient(url) as rb:
            assert await rb.run(OK_JOB, {"date": "2026-11-30"}, timeout=60) == 42
            with pytest.raises(Rejected):
                await rb.run(FAIL_JOB, {}, timeout=60)
            with pytest.raises(RunTimeout):
                await rb.run(SLOW_JOB, {}, timeout=1)

    asyncio.run(main())


def test_the_producer_example_is_a_thin_use_of_the_client(stack):
    url, _ = stack
    out = subprocess.run(
        [sys.executable, str(ROOT / "clients/python/examples/produce_and_wait.py"), str(OK_JOB), '{"date": "2026-11-30"}'],
        env=dict(os.environ, AMQP_URL=url, PYTHONPATH=str(ROOT / "clients/python/producer")),
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "42"
