# Databricks notebook source
# MAGIC %md
# MAGIC # Daily report
# MAGIC Started by runbridge: the job parameters `promise_id`, `url` and
# MAGIC `callback_token` say which promise this run settles. The `with` block
# MAGIC resolves it with `p.value`, or rejects it with the exception that
# MAGIC ended the block; heartbeats and progress tell runbridge the run is
# MAGIC alive and how far it got.

# COMMAND ----------

import os
import sys

# The bundle syncs clients/python with the repository's layout
# (databricks.yml, sync.paths); a notebook runs in its own folder.
sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "..", "..", "clients", "python")))
import runbridge_notebook as rb  # noqa: E402

# COMMAND ----------

date = dbutils.widgets.get("date")  # noqa: F821 (dbutils is a notebook global)

with rb.promise(dbutils=dbutils, heartbeat_seconds=60) as p:  # noqa: F821
    if not date:
        # Another attempt cannot help: reject for good.
        raise rb.FinalError("no date given")
    parts = ["orders", "refunds", "totals"]
    rows = 0
    for i, part in enumerate(parts):
        rows += spark.table(f"sales.{part}").where(f"day = '{date}'").count()  # noqa: F821
        p.progress(percent=100 * (i + 1) / len(parts), stage=part, rows=rows)
    p.value = {"date": date, "rows": rows}
