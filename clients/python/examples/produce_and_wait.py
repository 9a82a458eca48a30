"""A producer: publish one trigger and wait for its outcome.

    pip install ./clients/python/producer
    python produce_and_wait.py 101 '{"date": "2026-11-23"}'

Fan-out: run the job once per parameter set and hear one answer, the
values in order (or which child failed; the others are then cancelled)::

    python produce_and_wait.py 101 '{"env": "prod"}' \\
        --for-each '[{"date": "2026-11-01"}, {"date": "2026-11-02"}]' \\
        --max-concurrency 5

`runbridge_client` publishes with confirms and waits on a reply queue of
its own (``reply_to`` + ``correlation_id``); the trigger's ``id`` makes a
repeat harmless. Environment: ``AMQP_URL``, ``TRIGGERS_QUEUE`` (default
``runbridge.triggers``).
"""

import argparse
import json
import os
import sys

from runbridge_client import Client, Rejected, RunTimeout, Trigger


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job_id", type=int, nargs="?", default=101)
    ap.add_argument("params", nargs="?", default="{}", help="job parameters (JSON)")
    ap.add_argument("--for-each", help="a JSON list of parameter sets: one child run each")
    ap.add_argument("--join", choices=["all", "all_settled", "any"], default="all")
    ap.add_argument("--max-concurrency", type=int)
    args = ap.parse_args()
    trigger = Trigger(
        job_id=args.job_id,
        job_parameters=json.loads(args.params),
        timeout_seconds=3600,
        tags={"source": "produce_and_wait.py"},
    )
    if args.for_each:
        # A parent trigger: children <id>/0, <id>/1, ... each run the job
        # with its set laid over the shared parameters.
        trigger.for_each = json.loads(args.for_each)
        trigger.join = args.join
        trigger.max_concurrency = args.max_concurrency
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    with Client(url, triggers_queue=os.environ.get("TRIGGERS_QUEUE", "runbridge.triggers")) as rb:
        print(f"publishing {trigger.id}; waiting for its outcome", flush=True)
        try:
            print(json.dumps(rb.run(trigger=trigger, timeout=600), indent=2))
        except Rejected as e:
            sys.exit(f"{e.event.data.state}: {json.dumps(e.event.data.error, indent=2)}")
        except RunTimeout as e:
            sys.exit(str(e))


if __name__ == "__main__":
    main()
