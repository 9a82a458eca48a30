"""The callback side of a hand-written bridge: the notebook calls
`POST /resolve?id=..&value=..` (or `/reject`); the app settles the promise in
Redis once and publishes the event with publisher confirms. Flask, served by
gunicorn with one process (`gunicorn -w 1 -k gthread --threads 16 app:app`).

Configured by environment variables (see bench/baselines/README.md).
"""

import json
import os
import threading
import time

import pika
import redis
from flask import Flask, request

REDIS_URL = os.environ["BRIDGE_REDIS_URL"]
PREFIX = os.environ["BRIDGE_KEY_PREFIX"]
AMQP_URL = os.environ["BRIDGE_AMQP_URL"]
EXCHANGE = os.environ["BRIDGE_EVENTS_EXCHANGE"]

app = Flask(__name__)
r = redis.Redis.from_url(REDIS_URL)
# pika's BlockingConnection is not thread-safe: one per request thread.
local = threading.local()


def channel():
    ch = getattr(local, "channel", None)
    if ch is None or ch.is_closed:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        ch.confirm_delivery()
        local.channel = ch
    return ch


def settle(state):
    promise_id = request.args.get("id", "")
    value = request.args.get("value", "")
    if not promise_id:
        return {"error": "id is required"}, 400
    key = f"{PREFIX}:promise:{promise_id}"
    # SET ... XX GET: settles only an existing promise, and says what it was.
    previous = r.set(key, state, xx=True, get=True)
    if previous is None:
        return {"error": "no such promise"}, 404
    if previous != b"PENDING":
        return {"state": previous.decode(), "deduplicated": True}, 200
    r.hset(f"{PREFIX}:values", promise_id, value)
    run_id = r.hget(f"{PREFIX}:runs", promise_id)
    event = {
        "specversion": "1.0",
        "id": promise_id,
        "source": "python-bridge",
        "type": f"promise.{state.lower()}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {
            "id": promise_id,
            "state": state,
            "value": value,
            "run_id": int(run_id) if run_id else None,
        },
    }
    try:
        channel().basic_publish(
            EXCHANGE,
            f"promise.{state.lower()}",
            json.dumps(event).encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=promise_id,
            ),
            mandatory=False,
        )
    except pika.exceptions.AMQPError as e:
        # Put it back so the notebook's retry settles and publishes again.
        r.set(key, "PENDING")
        local.channel = None
        return {"error": f"event not published: {e}"}, 503
    return {"state": state}, 200


@app.post("/resolve")
def resolve():
    return settle("RESOLVED")


@app.post("/reject")
def reject():
    return settle("REJECTED")
