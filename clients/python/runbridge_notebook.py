"""runbridge notebook helper: settle the promise that started this run.

A single file with no dependencies beyond the standard library: ``%run`` it
from a notebook, copy it next to a Python task, or ``pip install`` the
folder (``clients/python``).

runbridge launches each run with three parameters (names configurable in
runbridge's ``[databricks]`` section): ``promise_id``, ``url`` (the callback
capability URL, ``{sidecar}/cb/{token}``) and ``callback_token``. This module
reads them from notebook widgets, task arguments or environment variables,
and talks to the sidecar::

    import runbridge_notebook as rb

    with rb.promise(dbutils=dbutils, heartbeat_seconds=60) as p:
        rows = run_the_job()
        p.value = {"rows_written": rows}
    # success: resolved with p.value; an exception: rejected with its
    # message and traceback (and re-raised, so the run fails too)

or step by step: ``rb.resolve(value)``, ``rb.reject(error)``,
``rb.heartbeat()``, ``rb.progress(...)``.

Progress: a long run can say how far it is. Each update counts as a
heartbeat, is kept on the promise (the console shows it) and reaches
consumers as a ``promise.progress`` event (at most one per second or so per
promise, the latest update winning)::

    with rb.promise(dbutils=dbutils) as p:
        for i, part in enumerate(parts):
            load(part)
            p.progress(percent=100 * (i + 1) / len(parts), stage="load", rows=i + 1)

Updates closer together than ``min_interval`` seconds (default 1) are
skipped here, before they cost a request; ``force=True`` sends one anyway.

Retries: a trigger (or runbridge's configuration) may give the promise a
retry policy, so that a failed run gets another attempt. A rejection then
counts as retryable unless it says it is final: raise ``rb.FinalError`` in
the ``with`` block (or call ``rb.reject(error, final=True)``) when another
attempt cannot help (bad input, say)::

    with rb.promise(dbutils=dbutils) as p:
        if not source_exists():
            raise rb.FinalError("no source data for this date")
        p.value = run_the_job()

A child of a parent trigger (one run of a fan-out, promise id
``<parent>/<n>``) is an ordinary run and uses the helper the same way::

    # the job, run once per date by {"job_id": ..., "for_each": [{"date": ...}, ...]}
    with rb.promise(dbutils=dbutils) as p:
        p.value = {"date": dbutils.widgets.get("date"), "rows": load_one_day()}
    # the parent resolves with every child's value, in order

Its value becomes its place in the parent's answer. If the parent settles
first (another child failed under fail_fast, an operator cancelled the
tree), the child's promise is cancelled with its run: a callback still
made then raises ``AlreadySettled`` with ``REJECTED_CANCELED``.

Answers: a 200 with ``"deduplicated": true`` (a retried or repeated call
that was already applied) is success; a 403 means the promise was already
settled otherwise (timed out, cancelled, settled by someone else) and raises
``AlreadySettled`` with its state. Connection errors and 5xx answers are
retried with exponential backoff; other 4xx raise ``CallbackError``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "Params",
    "params",
    "resolve",
    "reject",
    "heartbeat",
    "progress",
    "promise",
    "FinalError",
    "CallbackError",
    "AlreadySettled",
]

__version__ = "0.1.0"


class CallbackError(Exception):
    """The sidecar refused the call (or could not be reached in time)."""

    def __init__(self, message: str, status: Optional[int] = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


class FinalError(Exception):
    """Raised in a ``rb.promise`` block: the rejection is final, no retry."""


class AlreadySettled(CallbackError):
    """403: the promise was already settled some other way."""

    @property
    def state(self) -> Optional[str]:
        try:
            return self.body["error"]["state"]
        except (TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Params:
    promise_id: str
    url: str
    callback_token: Optional[str] = None

    def __repr__(self) -> str:  # never print the capability
        return f"Params(promise_id={self.promise_id!r}, url=<redacted>)"


NAMES = ("promise_id", "url", "callback_token")


def _from_widgets(dbutils: Any, name: str) -> Optional[str]:
    if dbutils is None:
        return None
    try:
        v = dbutils.widgets.get(name)
    except Exception:  # the widget does not exist in this run
        return None
    return v or None


def _from_argv(argv: list, name: str) -> Optional[str]:
    # Python/wheel tasks get parameters as ["--name=value", ...] or
    # ["--name", "value"].
    flag = f"--{name}"
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            return a[len(flag) + 1 :] or None
        if a == flag and i + 1 < len(argv):
            return argv[i + 1] or None
    return None


def params(
    dbutils: Any = None,
    argv: Optional[list] = None,
    environ: Optional[dict] = None,
    **given: str,
) -> Params:
    """The run's promise parameters: keyword arguments first, then notebook
    widgets (``dbutils``), task arguments (``sys.argv``) and environment
    variables ``RUNBRIDGE_PROMISE_ID`` / ``RUNBRIDGE_URL`` /
    ``RUNBRIDGE_CALLBACK_TOKEN``."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    found = {}
    for name in NAMES:
        found[name] = (
            given.get(name)
            or _from_widgets(dbutils, name)
            or _from_argv(argv, name)
            or environ.get(f"RUNBRIDGE_{name.upper()}")
        )
    missing = [n for n in ("promise_id", "url") if not found[n]]
    if missing:
        raise CallbackError(
            f"runbridge parameters missing: {', '.join(missing)} "
            "(expected as notebook widgets, task arguments --name=value, or "
            "RUNBRIDGE_* environment variables)"
        )
    return Params(found["promise_id"], found["url"].rstrip("/"), found["callback_token"])


def _post(
    p: Params,
    action: str,
    body: dict,
    retries: int = 6,
    timeout: float = 30.0,
    backoff: float = 0.5,
    with_id: bool = True,
) -> dict:
    """POST {url}/{action}?id=... with retries on connection errors and 5xx."""
    url = f"{p.url}/{action}?" + urllib.parse.urlencode({"id": p.promise_id})
    data = json.dumps(dict(body, id=p.promise_id) if with_id else body).encode()
    headers = {"Content-Type": "application/json"}
    # The run's trace, when the job passed one on (runbridge logs it with the callback).
    tp = os.environ.get("TRACEPARENT")
    if tp:
        headers["traceparent"] = tp
    if p.callback_token:
        headers["Authorization"] = f"Bearer {p.callback_token}"
    last: Optional[Exception] = None
    for attempt in range(retries + 1):
        if attempt:
            # Jittered exponential backoff, capped at 30 s.
            time.sleep(min(30.0, backoff * 2 ** (attempt - 1)) * (0.5 + random.random()))
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            if e.code >= 500:
                last = CallbackError(f"{action}: HTTP {e.code}", e.code, parsed)
                continue
            if e.code == 403:
                raise AlreadySettled(
                    f"{action}: promise {p.promise_id} is already settled"
                    + (f" ({parsed['error']['state']})" if isinstance(parsed, dict) and parsed.get("error", {}).get("state") else ""),
                    e.code,
                    parsed,
                ) from None
            raise CallbackError(f"{action}: HTTP {e.code}: {parsed}", e.code, parsed) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = CallbackError(f"{action}: {e}")
            continue
    assert last is not None
    raise last


def _value(v: Any) -> Any:
    return v if isinstance(v, str) or v is None else json.loads(json.dumps(v))


def resolve(value: Any = None, p: Optional[Params] = None, **kw: Any) -> dict:
    """Resolve the promise with ``value`` (a string, or anything JSON)."""
    p = p or params(**kw)
    return _post(p, "resolve", {"value": _value(value)})


def reject(error: Any = None, p: Optional[Params] = None, final: bool = False, **kw: Any) -> dict:
    """Reject the promise with ``error`` (a string, or anything JSON). With a
    retry policy, the promise gets another attempt unless ``final``; the
    answer is then the still pending promise."""
    p = p or params(**kw)
    body = {"error": _value(error)}
    if final:
        body["final"] = True
    return _post(p, "reject", body)


_last_progress: dict = {}


def progress(
    percent: Optional[float] = None,
    stage: Optional[str] = None,
    message: Optional[str] = None,
    p: Optional[Params] = None,
    min_interval: float = 1.0,
    force: bool = False,
    **metrics: float,
) -> Optional[dict]:
    """Report progress: ``percent`` (0-100), ``stage``, ``message`` and named
    numbers as keyword arguments. Skipped (``None``) when the last update of
    this promise was sent less than ``min_interval`` seconds ago, unless
    ``force``. Not retried: a lost update is superseded by the next."""
    p = p or params()
    now = time.monotonic()
    if not force and now - _last_progress.get(p.promise_id, -1e9) < min_interval:
        return None
    _last_progress[p.promise_id] = now
    body: dict = {}
    if percent is not None:
        body["percent"] = float(percent)
    if stage is not None:
        body["stage"] = str(stage)
    if message is not None:
        body["message"] = str(message)
    if metrics:
        body["metrics"] = {k: float(v) for k, v in metrics.items()}
    return _post(p, "progress", body, retries=1, timeout=10.0, with_id=False)


def heartbeat(p: Optional[Params] = None, **kw: Any) -> dict:
    """Push the promise's heartbeat deadline forward."""
    p = p or params(**kw)
    return _post(p, "heartbeat", {})


class _Promise:
    def __init__(self, p: Params, heartbeat_seconds: Optional[float]):
        self.params = p
        self.value: Any = None
        self.heartbeat_errors: list = []
        self._interval = heartbeat_seconds
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def progress(self, percent: Optional[float] = None, stage: Optional[str] = None, **kw: Any) -> Optional[dict]:
        """``rb.progress`` for this promise (rate-limited the same way)."""
        return progress(percent, stage, p=self.params, **kw)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                heartbeat(self.params)
            except AlreadySettled:
                return  # timed out or cancelled: nothing left to keep alive
            except CallbackError as e:  # keep the job running; report at the end
                self.heartbeat_errors.append(e)

    def __enter__(self) -> "_Promise":
        if self._interval:
            self._thread = threading.Thread(target=self._beat, name="runbridge-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exc is None:
            resolve(self.value, self.params)
        else:
            reject(
                {
                    "type": exc_type.__name__,
                    "message": str(exc),
                    "traceback": "".join(traceback.format_exception(exc_type, exc, tb)),
                },
                self.params,
                final=isinstance(exc, FinalError),
            )
        return False  # an exception goes on: the run fails as it should


def promise(
    dbutils: Any = None,
    heartbeat_seconds: Optional[float] = None,
    p: Optional[Params] = None,
    **kw: Any,
) -> _Promise:
    """``with promise() as p: ... p.value = result``: resolves with
    ``p.value`` on success, rejects with the exception (type, message,
    traceback) on failure and lets it propagate; heartbeats every
    ``heartbeat_seconds`` in a background thread while the block runs."""
    return _Promise(p or params(dbutils=dbutils, **kw), heartbeat_seconds)
