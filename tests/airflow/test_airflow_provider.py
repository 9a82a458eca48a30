"""Airflow's Databricks provider (apache-airflow-providers-databricks,
pinned in the Makefile) drives the emulator unchanged: its `DatabricksHook`
sync calls (jobs/create, jobs/list by name, jobs/reset, jobs/update,
run-now, runs/get, runs/get-output, runs/cancel, runs/cancel-all,
runs/delete, runs/repair, jobs/delete) and its deferrable
`DatabricksExecutionTrigger`, which polls with GET requests whose fields
come as a JSON body (`_a_do_api_call`), following a run to its terminal
event.

Teams that trigger Databricks from Airflow today send exactly these
requests; docs/databricks-fidelity.md lists what is modelled and its
sources.
"""

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from runbridge_stack import free_port, wait_http  # noqa: E402

BINARY = os.environ.get("RUNBRIDGE_BIN", str(ROOT / "target/debug/runbridge"))
TOKEN = "dapi-airflow"
CONN = "databricks_emulator"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen(
        [BINARY, "emulate", "--listen", f"127.0.0.1:{port}", "--token", TOKEN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, f"the emulator ({BINARY})", seconds=20)
    # Airflow reads connections from AIRFLOW_CONN_<ID> before anything else.
    os.environ["AIRFLOW_HOME"] = str(tmp_path_factory.mktemp("airflow"))
    os.environ[f"AIRFLOW_CONN_{CONN.upper()}"] = json.dumps(
        {"conn_type": "databricks", "host": "127.0.0.1", "port": port, "schema": "http", "password": TOKEN}
    )
    yield port
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def hook(emulator):
    from airflow.providers.databricks.hooks.databricks import DatabricksHook

    return DatabricksHook(CONN, retry_limit=2, retry_delay=0.1)


def notebook_job(name, **settings):
    return {
        "name": name,
        "tasks": [{"task_key": "nb", "notebook_task": {"notebook_path": "/Shared/nb"}}],
        **settings,
    }


def wait_terminal(hook, run_id, limit=20):
    deadline = time.time() + limit
    while True:
        state = hook.get_run_state(run_id)
        if state.is_terminal:
            return state
        assert time.time() < deadline, f"run {run_id} did not end: {state}"
        time.sleep(0.1)


def test_run_now_by_job_name_follows_the_run_to_its_output(hook):
    name = f"airflow-{time.time_ns()}"
    job_id = hook.create_job(
        notebook_job(
            name,
            max_concurrent_runs=5,
            tags={"emulator.outcome": "success_no_callback", "emulator.delay_ms": "50", "emulator.value": "42"},
        )
    )
    # DatabricksRunNowOperator(job_name=...) resolves the job through jobs/list.
    assert hook.find_job_id_by_name(name) == job_id
    assert hook.find_job_id_by_name(f"{name}-missing") is None
    run_id = hook.run_now({"job_id": job_id, "idempotency_token": f"af-{time.time_ns()}"})
    assert "/run/" in hook.get_run_page_url(run_id)
    state = wait_terminal(hook, run_id)
    assert state.is_successful, state
    run = hook.get_run(run_id)
    (task,) = run["tasks"]
    assert hook.get_run_output(task["run_id"])["notebook_output"]["result"] == "42"
    assert hook.get_job_id(run_id) == job_id


def test_jobs_list_pages_and_expands_tasks(hook):
    prefix = f"listed-{time.time_ns()}"
    ids = {hook.create_job(notebook_job(f"{prefix}-{i}")) for i in range(7)}
    listed = [j for j in hook.list_jobs(limit=3, expand_tasks=True) if j["settings"]["name"].startswith(prefix)]
    assert {j["job_id"] for j in listed} == ids
    assert all(j["settings"]["tasks"][0]["task_key"] == "nb" for j in listed)
    plain = [j for j in hook.list_jobs(limit=25) if j["settings"]["name"].startswith(prefix)]
    assert all("tasks" not in j["settings"] for j in plain)


def test_reset_and_update_change_the_job(hook):
    job_id = hook.create_job(notebook_job(f"changing-{time.time_ns()}", max_concurrent_runs=3))
    hook.update_job(job_id, {"description": "updated"})
    got = hook._do_api_call(("GET", "2.2/jobs/get"), {"job_id": job_id})
    assert got["settings"]["description"] == "updated"
    assert got["settings"]["max_concurrent_runs"] == 3
    hook.reset_job(job_id, notebook_job("reset"))
    got = hook._do_api_call(("GET", "2.2/jobs/get"), {"job_id": job_id})
    assert got["settings"]["name"] == "reset"
    assert "description" not in got["settings"]
    # What reset left out takes the 2.2 defaults again.
    assert got["settings"]["max_concurrent_runs"] == 1
    assert got["settings"]["queue"] == {"enabled": True}


def test_cancel_previous_runs_cancels_every_active_run(hook):
    job_id = hook.create_job(
        notebook_job(f"cancel-all-{time.time_ns()}", max_concurrent_runs=5, tags={"emulator.outcome": "never_finish"})
    )
    runs = [hook.run_now({"job_id": job_id}) for _ in range(3)]
    # DatabricksRunNowOperator(cancel_previous_runs=True) calls this first.
    hook.cancel_all_runs(job_id)
    for run_id in runs:
        state = wait_terminal(hook, run_id)
        assert state.result_state == "CANCELED", state


def test_a_run_is_deleted_once_it_ended(hook):
    from airflow.providers.common.compat.sdk import AirflowException

    job_id = hook.create_job(
        notebook_job(f"deleted-{time.time_ns()}", tags={"emulator.outcome": "never_finish"})
    )
    token = f"deleted-{time.time_ns()}"
    run_id = hook.run_now({"job_id": job_id, "idempotency_token": token})
    with pytest.raises(AirflowException):
        hook.delete_run(run_id)  # still active
    hook.cancel_run(run_id)
    wait_terminal(hook, run_id)
    hook.delete_run(run_id)
    with pytest.raises(AirflowException, match="does not exist"):
        hook.get_run(run_id)
    # The token of a deleted run starts nothing again.
    with pytest.raises(AirflowException, match="deleted"):
        hook.run_now({"job_id": job_id, "idempotency_token": token})


def test_repair_with_job_parameters(hook):
    job_id = hook.create_job(
        notebook_job(
            f"repaired-{time.time_ns()}",
            parameters=[{"name": "promise_id", "default": ""}, {"name": "day", "default": "monday"}],
            tags={"emulator.outcome": "success_no_callback", "emulator.delay_ms": "50", "emulator.fail_attempts": "1"},
        )
    )
    run_id = hook.run_now({"job_id": job_id, "job_parameters": {"promise_id": f"p-{time.time_ns()}", "day": "tuesday"}})
    assert wait_terminal(hook, run_id).result_state == "FAILED"
    # The provider sends job_parameters with every repair (a repair runs
    # with the job's settings, not the run's overrides).
    latest = hook.get_latest_repair_id(run_id)
    repair_id = hook.repair_run(
        {"run_id": run_id, "rerun_all_failed_tasks": True, "latest_repair_id": latest, "job_parameters": {"day": "friday"}}
    )
    assert repair_id
    assert wait_terminal(hook, run_id).is_successful
    tasks = hook.get_run(run_id)["tasks"]
    # The failed attempt and the repair's: one task key, two attempts.
    assert [(t["task_key"], t["attempt_number"]) for t in tasks] == [("nb", 0), ("nb", 1)]
    assert hook.get_latest_repair_id(run_id) == repair_id


def trigger_event(run_id):
    """The first event of the provider's deferrable trigger following the
    run, as Airflow's triggerer runs it: an async generator, polling with
    GETs whose fields are a JSON body."""
    from airflow.providers.databricks.triggers.databricks import DatabricksExecutionTrigger

    trigger = DatabricksExecutionTrigger(
        run_id=run_id, databricks_conn_id=CONN, polling_period_seconds=0.1, retry_limit=2, retry_delay=0.1
    )

    async def first_event():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first_event(), timeout=30))


def test_the_deferrable_trigger_follows_a_run_to_its_terminal_event(hook):
    job_id = hook.create_job(
        notebook_job(
            f"deferred-{time.time_ns()}",
            tags={"emulator.outcome": "success_no_callback", "emulator.delay_ms": "300", "emulator.value": "done"},
        )
    )
    run_id = hook.run_now({"job_id": job_id})
    payload = trigger_event(run_id)
    assert payload["run_id"] == run_id
    state = json.loads(payload["run_state"])
    assert state["life_cycle_state"] == "TERMINATED"
    assert state["result_state"] == "SUCCESS"
    assert payload["errors"] == []


def test_the_deferrable_trigger_reports_a_failed_task(hook):
    job_id = hook.create_job(
        notebook_job(f"deferred-fail-{time.time_ns()}", tags={"emulator.outcome": "fail", "emulator.delay_ms": "100"})
    )
    run_id = hook.run_now({"job_id": job_id})
    payload = trigger_event(run_id)
    assert json.loads(payload["run_state"])["result_state"] == "FAILED"
    (error,) = payload["errors"]
    assert error["task_key"] == "nb"
