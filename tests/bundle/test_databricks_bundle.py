"""examples/databricks-bundle: the job definition is valid, and it runs.

1. Every job of the bundle is read by `databricks-bundles` (Databricks'
   typed job definitions, from PyPI), which refuses an unknown field or a
   wrong type; the job takes runbridge's three values as job parameters
   with empty defaults, notifies the destination the bundle names, and its
   notebook finds the helper where the bundle syncs it.
2. The same job settings go to the emulator's `jobs/create`; a trigger for
   the new job, published through a real `runbridge all` (worker and
   sidecar, RabbitMQ and Redis of this machine, names of its own), launches
   a run that receives the three values as job parameters and calls back,
   and the trigger's completion event says RESOLVED.
"""

import copy
import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from databricks.bundles.jobs import Job

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from runbridge_stack import running  # noqa: E402

BUNDLE = ROOT / "examples" / "databricks-bundle"
CALLBACK_PARAMS = ("promise_id", "url", "callback_token")
DESTINATION = "runbridge-sidecar-destination"


def bundle_jobs():
    """Each job of the bundle, with the folder of the file that defines it."""
    root = yaml.safe_load((BUNDLE / "databricks.yml").read_text())
    files = [BUNDLE / "databricks.yml"]
    for pattern in root.get("include", []):
        files += sorted(BUNDLE.glob(pattern))
    jobs = {}
    for f in files:
        doc = yaml.safe_load(f.read_text())
        for key, job in (doc.get("resources") or {}).get("jobs", {}).items():
            jobs[key] = (job, f.parent)
    assert jobs, "the bundle defines no job"
    return root, jobs


def resolved(job):
    """The job as the bundle would deploy it, for the emulator: variables
    replaced, no `${...}` left."""
    text = json.dumps(job).replace("${var.runbridge_destination_id}", DESTINATION)
    assert "${" not in text, text
    return json.loads(text)


def test_the_bundle_validates():
    root, jobs = bundle_jobs()
    assert root["bundle"]["name"]
    assert "runbridge_destination_id" in root["variables"]
    for key, (job, folder) in jobs.items():
        typed = Job.from_dict(job)  # raises on an unknown field or a wrong type
        params = {p.name: p.default for p in typed.parameters}
        for name in CALLBACK_PARAMS:
            assert params.get(name) == "", f"{key}: job parameter {name} with an empty default"
        assert typed.queue.enabled or typed.max_concurrent_runs > 1, f"{key}: triggers would be skipped"
        for event in ("on_start", "on_success", "on_failure"):
            ids = [d["id"] for d in job["webhook_notifications"][event]]
            assert ids == ["${var.runbridge_destination_id}"], f"{key}: {event} notifies runbridge"
        for task in job["tasks"]:
            notebook = (folder / task["notebook_task"]["notebook_path"]).resolve()
            assert notebook.exists(), notebook
            # The notebook adds ../../../clients/python (relative to its own
            # folder) to sys.path: with the bundle's sync paths, that is the
            # repository's clients/python.
            text = notebook.read_text()
            assert '"..", "..", "..", "clients", "python"' in text
            assert (notebook.parent / ".." / ".." / ".." / "clients" / "python" / "runbridge_notebook.py").resolve().exists()
            assert "rb.promise(" in text and "p.progress(" in text
    assert "../../clients/python" in root["sync"]["paths"]


def test_the_validator_refuses_a_wrong_field():
    _, jobs = bundle_jobs()
    job, _ = next(iter(jobs.values()))
    for broken in (
        dict(job, max_concurent_runs=2),
        dict(job, max_concurrent_runs="many"),
        dict(job, tasks=[{"task_key": "t", "notebook_task": {"notebok_path": "x"}}]),
    ):
        with pytest.raises(ValueError):
            Job.from_dict(copy.deepcopy(broken))


def post(url, body):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": "Bearer dapi-bundle-test", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def get(url):
    req = urllib.request.Request(url, headers={"Authorization": "Bearer dapi-bundle-test"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def stack():
    tag = f"bundle-{uuid.uuid4().hex[:8]}"
    settings = {
        "RUNBRIDGE__REDIS__KEY_PREFIX": tag,
        "RUNBRIDGE__AMQP__TRIGGERS_QUEUE": f"{tag}.triggers",
        "RUNBRIDGE__AMQP__CONTROL_QUEUE": f"{tag}.control",
        "RUNBRIDGE__AMQP__EVENTS_EXCHANGE": f"{tag}.events",
        "RUNBRIDGE__AMQP__DEAD_LETTER_EXCHANGE": f"{tag}.dlx",
        "RUNBRIDGE__AMQP__DEAD_LETTER_QUEUE": f"{tag}.dead",
        "DATABRICKS_TOKEN": "dapi-bundle-test",
    }
    with running(settings, []) as s:
        yield s.binary, s.env, f"{s.emulator}/api/2.2"


def test_the_bundles_job_runs_end_to_end_against_the_emulator(stack):
    binary, env, api = stack
    _, jobs = bundle_jobs()
    job, _ = jobs["daily_report"]
    job_id = post(f"{api}/jobs/create", resolved(job))["job_id"]
    assert get(f"{api}/jobs/get?job_id={job_id}")["settings"]["name"] == job["name"]

    out = subprocess.run(
        [str(binary), "trigger", "--job-id", str(job_id), "--param", "date=2026-11-30",
         "--wait", "--wait-seconds", "60", "--compact"],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr
    event = json.loads(out.stdout.strip().splitlines()[-1])
    assert event["data"]["state"] == "RESOLVED", event
    assert event["data"]["settled_by"] == "callback", event

    # The run received the three values as the job parameters its job
    # defines, beside the producer's own.
    run_id = event["data"]["run_id"]
    run = get(f"{api}/jobs/runs/get?run_id={run_id}")
    given = {p["name"]: p.get("value") for p in run.get("job_parameters", [])}
    assert given["promise_id"] == event["data"]["promise_id"], given
    assert given["url"].startswith(env["RUNBRIDGE__SIDECAR__PUBLIC_URL"] + "/cb/"), given
    assert given["callback_token"], given
    assert given["date"] == "2026-11-30", given
