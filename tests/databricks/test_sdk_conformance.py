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
    job_id = w.jobs.create(
        name="no queue",
        max_concurrent_runs=1,
        queue=jobs.QueueSettings(enabled=False),
        tags={"emulator.outcome": "never_finish"},
    ).job_id
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


def test_jobs_list_by_name_and_expanded(w):
    prefix = f"listed-{time.time_ns()}"
    ids = [w.jobs.create(name=f"{prefix}-{i}", tasks=[jobs.Task(task_key="nb", notebook_task=jobs.NotebookTask(notebook_path="/nb"))]).job_id for i in range(5)]
    # The SDK's list follows next_page_token; newest first.
    listed = [j.job_id for j in w.jobs.list(limit=2) if j.settings.name.startswith(prefix)]
    assert listed == sorted(ids, reverse=True)
    # `name` is the exact name, case-insensitive.
    (one,) = list(w.jobs.list(name=f"{prefix}-3".upper()))
    assert one.job_id == ids[3]
    assert not one.settings.tasks
    (expanded,) = list(w.jobs.list(name=f"{prefix}-3", expand_tasks=True))
    assert expanded.settings.tasks[0].task_key == "nb"


def test_create_fills_the_2_2_defaults_and_update_reset_delete(w):
    job_id = w.jobs.create(name=f"defaults-{time.time_ns()}", description="first").job_id
    settings = w.jobs.get(job_id).settings
    assert settings.max_concurrent_runs == 1
    assert settings.queue.enabled is True
    w.jobs.update(job_id, new_settings=jobs.JobSettings(max_concurrent_runs=4), fields_to_remove=["description"])
    settings = w.jobs.get(job_id).settings
    assert settings.max_concurrent_runs == 4 and settings.description is None
    w.jobs.reset(job_id, new_settings=jobs.JobSettings(name="reset"))
    settings = w.jobs.get(job_id).settings
    assert settings.name == "reset" and settings.max_concurrent_runs == 1
    w.jobs.delete(job_id)
    with pytest.raises(errors.ResourceDoesNotExist):
        w.jobs.get(job_id)


def test_a_job_with_max_concurrent_runs_0_skips_every_run(w):
    job_id = w.jobs.create(name="zero", max_concurrent_runs=0, queue=jobs.QueueSettings(enabled=True)).job_id
    run = w.jobs.get_run(w.jobs.run_now(job_id=job_id).response.run_id)
    assert run.state.life_cycle_state == jobs.RunLifeCycleState.SKIPPED


def test_cancel_all_runs_of_a_job_and_every_queued_run(w):
    job_id = w.jobs.create(
        name="cancel all", max_concurrent_runs=2, tags={"emulator.outcome": "never_finish"}
    ).job_id
    runs = [w.jobs.run_now(job_id=job_id).response.run_id for _ in range(3)]
    assert w.jobs.get_run(runs[2]).status.state == jobs.RunLifecycleStateV2State.QUEUED
    w.jobs.cancel_all_runs(job_id=job_id)
    for run_id in runs:
        assert terminated(w, run_id).state.result_state == jobs.RunResultState.CANCELED
    other = w.jobs.create(name="queued", max_concurrent_runs=1, tags={"emulator.outcome": "never_finish"}).job_id
    first, queued = (w.jobs.run_now(job_id=other).response.run_id for _ in range(2))
    w.jobs.cancel_all_runs(all_queued_runs=True)
    assert terminated(w, queued).state.result_state == jobs.RunResultState.CANCELED
    assert w.jobs.get_run(first).status.state == jobs.RunLifecycleStateV2State.RUNNING
    w.jobs.cancel_run(first)


def test_a_deleted_run_and_its_token(w):
    token = f"deleted-{time.time_ns()}"
    run_id = w.jobs.run_now(job_id=NEVER_JOB, idempotency_token=token).response.run_id
    with pytest.raises(errors.InvalidParameterValue):
        w.jobs.delete_run(run_id)  # "Returns an error if the run is active."
    w.jobs.cancel_run(run_id)
    terminated(w, run_id)
    w.jobs.delete_run(run_id)
    with pytest.raises(errors.ResourceDoesNotExist):
        w.jobs.get_run(run_id)
    # "If a run with the provided token is deleted, an error is returned."
    with pytest.raises(errors.InvalidParameterValue, match="deleted"):
        w.jobs.run_now(job_id=NEVER_JOB, idempotency_token=token)


def test_list_runs_filters(w):
    job_id = w.jobs.create(
        name="filtered", max_concurrent_runs=10, tags={"emulator.outcome": "success_no_callback", "emulator.delay_ms": "10"}
    ).job_id
    before = int(time.time() * 1000)
    done = [w.jobs.run_now(job_id=job_id).response.run_id for _ in range(2)]
    for run_id in done:
        terminated(w, run_id)
    w.jobs.update(job_id, new_settings=jobs.JobSettings(tags={"emulator.outcome": "never_finish"}))
    active = w.jobs.run_now(job_id=job_id).response.run_id
    assert [r.run_id for r in w.jobs.list_runs(job_id=job_id, active_only=True)] == [active]
    assert sorted(r.run_id for r in w.jobs.list_runs(job_id=job_id, completed_only=True)) == sorted(done)
    assert {r.run_id for r in w.jobs.list_runs(job_id=job_id, start_time_from=before)} == {*done, active}
    assert not list(w.jobs.list_runs(job_id=job_id, start_time_to=before - 1))
    plain = next(iter(w.jobs.list_runs(job_id=job_id)))
    assert not plain.tasks
    expanded = next(iter(w.jobs.list_runs(job_id=job_id, expand_tasks=True)))
    assert expanded.tasks and expanded.tasks[0].task_key == "notebook"
    w.jobs.cancel_run(active)


def test_requests_are_read_by_the_json_mapping(w, emulator):
    """int64 fields as JSON strings, `null` as absent, a GET's fields in a
    JSON body: what Databricks' protobuf-defined API accepts."""
    api = w.api_client
    run_id = api.do(
        "POST",
        "/api/2.2/jobs/runs/submit",
        body={
            "run_name": "mapped",
            "tasks": [{"task_key": "t", "notebook_task": {"notebook_path": "/x"}, "dbt_task": None}],
            "timeout_seconds": None,
        },
    )["run_id"]
    got = api.do("GET", "/api/2.2/jobs/runs/get", body={"run_id": str(run_id)})
    assert got["run_id"] == run_id
    # The null dbt_task is no dbt task: a notebook task, with notebook output.
    task_run = got["tasks"][0]["run_id"]
    assert "notebook_output" in api.do("GET", "/api/2.2/jobs/runs/get-output", query={"run_id": task_run})
    api.do("POST", "/api/2.2/jobs/runs/cancel", body={"run_id": str(run_id)})
    terminated(w, run_id)
    # Jobs API 2.2 submits tasks in the multi-task form only.
    with pytest.raises(errors.InvalidParameterValue, match="multi-task"):
        api.do("POST", "/api/2.2/jobs/runs/submit", body={"run_name": "legacy", "notebook_task": {"notebook_path": "/x"}})


def test_a_retried_task_lists_each_attempt(w):
    job_id = w.jobs.create(
        name="retried",
        tasks=[jobs.Task(task_key="only", notebook_task=jobs.NotebookTask(notebook_path="/x"), max_retries=1)],
        tags={"emulator.outcome": "retry_then_exit", "emulator.delay_ms": "50", "emulator.value": "second"},
    ).job_id
    run = terminated(w, w.jobs.run_now(job_id=job_id).response.run_id)
    assert [(t.task_key, t.attempt_number) for t in run.tasks] == [("only", 0), ("only", 1)]
    assert run.tasks[0].state.result_state == jobs.RunResultState.FAILED
    assert w.jobs.get_run_output(run.tasks[1].run_id).notebook_output.result == "second"
    # The parent of a one-task run answers with its latest attempt's output.
    assert w.jobs.get_run_output(run.run_id).notebook_output.result == "second"


def test_the_2_1_paths_serve_the_same(w):
    """Clients still on Jobs API 2.1 reach the same operations."""
    api = w.api_client
    job_id = api.do("POST", "/api/2.1/jobs/create", body={"name": f"on-2.1-{time.time_ns()}", "tags": {"emulator.outcome": "never_finish"}})["job_id"]
    assert [j["job_id"] for j in api.do("GET", "/api/2.1/jobs/list", query={"name": api.do("GET", "/api/2.1/jobs/get", query={"job_id": job_id})["settings"]["name"]})["jobs"]] == [job_id]
    run_id = api.do("POST", "/api/2.1/jobs/run-now", body={"job_id": job_id})["run_id"]
    api.do("POST", "/api/2.1/jobs/runs/cancel-all", body={"job_id": job_id})
    assert terminated(w, run_id).state.result_state == jobs.RunResultState.CANCELED
    api.do("POST", "/api/2.1/jobs/runs/delete", body={"run_id": run_id})
    assert not api.do("GET", "/api/2.1/jobs/runs/list", query={"job_id": job_id}).get("runs")
    api.do("POST", "/api/2.1/jobs/delete", body={"job_id": job_id})
