"""Triggers and completion events, typed as runbridge's JSON Schemas say
(docs/schemas/trigger.schema.json and event.schema.json)."""

import json
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional


@dataclass
class Trigger:
    """One trigger. Either ``job_id`` (a job's run, with ``job_parameters``
    or legacy ``notebook_params``) or ``submit`` (a one-time run). With
    ``for_each``, a parent: one child run per parameter set, joined by
    ``join``. Fields left ``None`` are not sent (runbridge's defaults apply).
    """

    job_id: Optional[int] = None
    job_parameters: Optional[Dict[str, str]] = None
    notebook_params: Optional[Dict[str, str]] = None
    submit: Optional[Dict[str, Any]] = None
    id: str = field(default_factory=lambda: f"py-{uuid.uuid4().hex}")
    workspace: Optional[str] = None
    tags: Optional[Dict[str, str]] = None
    timeout_seconds: Optional[int] = None
    heartbeat_seconds: Optional[int] = None
    cancel_on_timeout: Optional[bool] = None
    retry: Optional[Dict[str, Any]] = None
    for_each: Optional[List[Dict[str, str]]] = None
    children: Optional[List[Dict[str, Any]]] = None
    join: Optional[str] = None
    fail_fast: Optional[bool] = None
    max_concurrency: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.job_id is None) == (self.submit is None):
            raise ValueError("a trigger names a job_id or a submit, not both or neither")
        if self.job_parameters is not None and self.notebook_params is not None:
            raise ValueError("job_parameters or notebook_params, not both")

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


@dataclass
class EventData:
    """What happened to the promise (the event's ``data``)."""

    promise_id: str
    state: str
    value: Any
    error: Any
    tags: Dict[str, str]
    created_at: str
    settled_at: str
    run_id: Optional[int] = None
    job_id: Optional[int] = None
    run_page_url: Optional[str] = None
    settled_by: Optional[str] = None
    attempt: Optional[int] = None
    attempts: Optional[List[Dict[str, Any]]] = None
    parent: Optional[str] = None
    children: Optional[Any] = None

    @property
    def resolved(self) -> bool:
        return self.state == "RESOLVED"


@dataclass
class Event:
    """A completion event: a CloudEvent whose ``id`` is stable across
    redeliveries (deduplicate by it)."""

    id: str
    type: str
    source: str
    subject: str
    time: str
    data: EventData
    specversion: str = "1.0"
    datacontenttype: str = "application/json"

    @classmethod
    def from_json(cls, body: bytes) -> "Event":
        raw = json.loads(body)
        known = {f.name for f in fields(EventData)}
        data = EventData(**{k: v for k, v in raw["data"].items() if k in known})
        top = {f.name for f in fields(cls)} - {"data"}
        return cls(data=data, **{k: v for k, v in raw.items() if k in top})

    def outcome(self) -> Any:
        """What ``run`` answers with: the resolved value, or `Rejected`."""
        if self.data.resolved:
            return self.data.value
        raise Rejected(self)


class Rejected(Exception):
    """The promise was rejected (its run failed, was cancelled, timed out,
    or Databricks refused the launch): ``event.data.error`` says why."""

    def __init__(self, event: Event):
        super().__init__(f"{event.data.promise_id} {event.data.state}: {json.dumps(event.data.error)[:500]}")
        self.event = event
