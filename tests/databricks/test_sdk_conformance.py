"""Databricks' own Python SDK (databricks-sdk, pinned in the Makefile) drives
the emulator through every Jobs API endpoint runbridge uses.

The SDK's `databricks/sdk/service/jobs.py` and `databricks/sdk/errors/` are
generated from Databricks' API specification: where this suite passes, the
emulator answers in shapes, states and error classes that Databricks'
generated client accepts, not merely ones runbridge's own client accepts.
docs/databricks-fidelity.md lists what is modelled and its sources.
"""

import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk import errors
from databricks.sdk.core import Config
from databricks.sdk.service import jobs

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from runbridge_stack import free_port, wait_http  # noqa: E402

BINARY = os.environ.get("RUNBRIDGE_BIN", str(ROOT / "target/debug/runbridge"))
TOKEN = "dapi-conformance"
EXIT_JOB = 1
NEVER_JOB = 2


@pytest.fixture(scope="module")
def emulator():
    port = free_port()
    proc = subprocess.Popen(
        [
            BINARY,
            "emulate",
            "--listen",
            f"127.0.0.1:{port}",
            "--token",
            TOKEN,
            "--job",
            f"{EXIT_JOB}:success_no_callback:50:exit-value",
            "--job",
            f"{NEVER_JOB}:never_finish:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc, f"the emulator ({BINARY})", seconds=20)
    yield url
    proc.kill()
    proc.wait()


def client(url, token=TOKEN):
    # Short retries of the SDK's own: nothing here should need them.
    return WorkspaceClient(config=Config(host=url, token=token, auth_type="pat", retry_timeout_seconds=5))


@pytest.fixture(scope="module")
def w(emulator):
    return client(emulator)


def wait_for(fn, what, limit=15):
    deadline = time.time() + limit
    while True:
        v = fn()
        if v:
            return v
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def terminated(w, run_id):
    return wait_for(
        lambda: (r := w.jobs.get_run(run_id)).status.state == jobs.RunLifecycleStateV2State.TERMINATED and r,
        f"run {run_id} terminated",
    )


def test_run_now_twice_with_one_token_is_one_run(w):
    token = f"conformance-{time.time_ns()}"
    first = w.jobs.run_now(job_id=EXIT_JOB, idempotency_token=token).response.run_id
    second = w.jobs.run_now(job_id=EXIT_JOB, idempotency_token=token).response.run_id
    assert first == second
    runs = [r for r in w.jobs.list_runs(job_id=EXIT_JOB) if r.run_id == first]
    assert len(runs) == 1


def test_get_run_parses_with_status_and_termination_details(w):
    run_id = w.jobs.run_now(job_id=EXIT_JOB, job_parameters={"promise_id": "p"}).response.run_id
    run = terminated(w, run_id)
    # Every enum the SDK parses is known to it (an unknown value is None).
    assert run.status.state == jobs.RunLifecycleStateV2State.TERMINATED
    assert run.status.termination_details.code == jobs.TerminationCodeCode.SUCCESS
    assert run.status.termination_details.type == jobs.TerminationTypeType.SUCCESS
    assert run.state.life_cycle_state == jobs.RunLifeCycleState.TERMINATED
    assert run.state.result_state == jobs.RunResultState.SUCCESS
    assert run.run_page_url and run.run_page_url.endswith(f"/run/{run_id}")
    assert len(run.tasks) == 1 and run.tasks[0].run_id != run_id
    assert run.tasks[0].status.state == jobs.RunLifecycleStateV2State.TERMINATED


def test_a_running_run_has_a_v2_state(w):
    run_id = w.jobs.run_now(job_id=NEVER_JOB).response.run_id
    run = wait_for(
        lambda: (r := w.jobs.get_run(run_id)).status.state == jobs.RunLifecycleStateV2State.RUNNING and r,
        "running",
    )
    assert run.state.life_cycle_state == jobs.RunLifeCycleState.RUNNING
    w.jobs.cancel_run(run_id)
    run = terminated(w, run_id)
    assert run.state.result_state == jobs.RunResultState.CANCELED
    assert run.status.termination_details.code == jobs.TerminationCodeCode.USER_CANCELED


def test_submit_and_the_output_of_its_task(w):
    run_id = w.jobs.submit(
        run_name="conformance",
        tasks=[
            jobs.SubmitTask(
                task_key="only",
                notebook_task=jobs.NotebookTask(notebook_path="/x"),
                existing_cluster_id="c",
            )
        ],
        idempotency_token=f"submit-{time.time_ns()}",
    ).response.run_id
    w.jobs.cancel_run(run_id)
    run = terminated(w, run_id)
    out = w.jobs.get_run_output(run.tasks[0].run_id)
    assert out.metadata.run_id == run.tasks[0].run_id


def test_output_of_a_task_run_and_refusal_for_a_multi_task_parent(w):
    job = w.jobs.create(
        name="two tasks",
        tasks=[
            jobs.Task(task_key="a", notebook_task=jobs.NotebookTask(notebook_path="/a")),
            jobs.Task(task_key="b", notebook_task=jobs.NotebookTask(notebook_path="/b")),
        ],
        tags={"emulator.outcome": "success_no_callback", "emulator.delay_ms": "20", "emulator.value.b": "from b"},
    ).job_id
    run = terminated(w, w.jobs.run_now(job_id=job).response.run_id)
    by_key = {t.task_key: t.run_id for t in run.tasks}
    assert w.jobs.get_run_output(by_key["b"]).notebook_output.result == "from b"
    with pytest.raises(errors.InvalidParameterValue, match="multiple tasks is not supported"):
        w.jobs.get_run_output(run.run_id)


def test_runs_and_jobs_with_more_than_a_page_of_tasks(w):
    tasks = [jobs.Task(task_key=f"t{i:03}", notebook_task=jobs.NotebookTask(notebook_path="/t")) for i in range(150)]
    job_id = w.jobs.create(
        name="big", tasks=tasks, tags={"emulator.outcome": "success_no_callback", "emulator.delay_ms": "20"}
    ).job_id
    # The SDK's get follows next_page_token.
    assert len(w.jobs.get(job_id).settings.tasks) == 150
    run = terminated(w, w.jobs.run_now(job_id=job_id).response.run_id)
    assert len(run.tasks) == 150
    assert len({t.run_id for t in run.tasks}) == 150


def test_list_runs_follows_pages(w):
    job_id = w.jobs.create(
        name="many runs", tags={"emulator.outcome": "success_no_callback", "emulator.delay_ms": "10"}
    ).job_id
    started = {w.jobs.run_now(job_id=job_id).response.run_id for _ in range(30)}
    listed = [r.run_id for r in w.jobs.list_runs(job_id=job_id, limit=7)]
    assert set(listed) == started and len(listed) == 30


def test_an_unknown_run_and_job_are_resource_does_not_exist(w):
    # The SDK's override turns 400 "Run N does not exist" into this class.
    with pytest.raises(errors.ResourceDoesNotExist):
        w.jobs.get_run(987654321)
    with pytest.raises(errors.ResourceDoesNotExist):
        w.jobs.get(987654321)
    with pytest.raises(errors.InvalidParameterValue, match="does not exist"):
        w.jobs.cancel_run(987654321)


def test_parameters_a_job_cannot_take_are_refused(w):
    plain = w.jobs.create(name="plain").job_id
    with_params = w.jobs.create(
        name="with", parameters=[jobs.JobParameterDefinition(name="date", default="")]
    ).job_id
    with pytest.raises(errors.InvalidParameterValue):
        w.jobs.run_now(job_id=plain, job_parameters={"date": "d"})
    with pytest.raises(errors.InvalidParameterValue):
        w.jobs.run_now(job_id=with_params, notebook_params={"date": "d"})


def test_a_queued_run(w):
    job_id = w.jobs.create(
        name="one at a time",
        max_concurrent_runs=1,
        queue=jobs.QueueSettings(enabled=True),
        tags={"emulator.outcome": "never_finish"},
    ).job_id
    first = w.jobs.run_now(job_id=job_id).response.run_id
    second = w.jobs.run_now(job_id=job_id).response.run_id
    run = w.jobs.get_run(second)
    assert run.status.state == jobs.RunLifecycleStateV2State.QUEUED
    assert run.status.queue_details.code == jobs.QueueDetailsCodeCode.MAX_CONCURRENT_RUNS_REACHED
    w.jobs.cancel_run(first)
    wait_for(
        lambda: w.jobs.get_run(second).status.state == jobs.RunLifecycleStateV2State.RUNNING,
        "the queued run starts",
    )
    w.jobs.cancel_run(second)


def test_without_queueing_the_extra_run_is_skipped(w):
    job_id = w.jobs.create(name="no queue", max_concurrent_runs=1, tags={"emulator.outcome": "never_finish"}).job_id
    first = w.jobs.run_now(job_id=job_id).response.run_id
    run = w.jobs.get_run(w.jobs.run_now(job_id=job_id).response.run_id)
    assert run.state.life_cycle_state == jobs.RunLifeCycleState.SKIPPED
    assert run.state.result_state == jobs.RunResultState.MAXIMUM_CONCURRENT_RUNS_REACHED
    assert run.status.termination_details.code == jobs.TerminationCodeCode.MAX_CONCURRENT_RUNS_EXCEEDED
    w.jobs.cancel_run(first)


def set_token(url, state, html=False):
    req = urllib.request.Request(
        f"{url}/emulator/tokens",
        data=('{"token": "%s", "state": "%s", "html": %s}' % (TOKEN, state, "true" if html else "false")).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=5)


def test_an_invalid_or_revoked_token(emulator):
    # 403 {"error_code": 403, ...}: the SDK maps it by its status.
    with pytest.raises(errors.PermissionDenied, match="Invalid access token"):
        client(emulator, "dapi-wrong").jobs.get_run(1)
    try:
        set_token(emulator, "revoked", html=True)
        # The older HTML page: the SDK reads its <pre>.
        with pytest.raises(errors.PermissionDenied, match="Invalid access token"):
            client(emulator).jobs.list_runs(limit=1).__next__()
    finally:
        set_token(emulator, "valid")
    next(iter(client(emulator).jobs.list_runs(limit=1)), None)


def test_repair_and_its_history(w):
    """`runs/repair` reruns the failed task of the same run; a stale or
    missing `latest_repair_id` is refused; `repair_history` parses."""
    job = w.jobs.create(
        name=f"repair-{time.time_ns()}",
        tasks=[
            jobs.Task(task_key="a", notebook_task=jobs.NotebookTask(notebook_path="/a")),
            jobs.Task(task_key="b", notebook_task=jobs.NotebookTask(notebook_path="/b")),
        ],
        parameters=[jobs.JobParameterDefinition(name="promise_id", default="")],
        tags={
            "emulator.outcome": "success_no_callback",
            "emulator.delay_ms": "50",
            "emulator.fail_attempts": "1",
            "emulator.fail_task": "b",
        },
    ).job_id
    run_id = w.jobs.run_now(job_id=job, job_parameters={"promise_id": f"p-{time.time_ns()}"}).response.run_id
    run = terminated(w, run_id)
    assert run.state.result_state == jobs.RunResultState.FAILED
    by_key = {t.task_key: t for t in run.tasks}
    assert by_key["a"].state.result_state == jobs.RunResultState.SUCCESS
    assert by_key["b"].state.result_state == jobs.RunResultState.FAILED
    first_b = by_key["b"].run_id

    repair_id = w.jobs.repair_run(run_id, rerun_all_failed_tasks=True).response.repair_id
    assert repair_id
    run = terminated(w, run_id)
    assert run.state.result_state == jobs.RunResultState.SUCCESS
    by_key = {t.task_key: t for t in run.tasks}
    assert by_key["b"].run_id != first_b, "the failed task ran again"

    history = w.jobs.get_run(run_id, include_history=True).repair_history
    assert [h.type for h in history] == [jobs.RepairHistoryItemType.ORIGINAL, jobs.RepairHistoryItemType.REPAIR]
    assert history[1].id == repair_id
    assert history[1].task_run_ids == [by_key["b"].run_id]
    assert history[0].state.result_state == jobs.RunResultState.FAILED

    for stale in (None, repair_id + 1):
        with pytest.raises(errors.InvalidParameterValue):
            w.jobs.repair_run(run_id, rerun_tasks=["a"], latest_repair_id=stale)
    assert w.jobs.repair_run(run_id, rerun_tasks=["a"], latest_repair_id=repair_id).response.repair_id > repair_id
