"""While the trainer cannot reach its store: its metrics flush never holds up the end of a run, the
records written once the store answers say what failed, and ``pixpro status`` shows how old the newest
record is and warns when a running trainer's is stale."""

from __future__ import annotations

import json
import time

from cluster.progress import Progress
from cluster.status import STALE_RECORD_S, checkpoint_warnings
from launch.records import MetricsLog
from launch.store import CheckpointStore
from tests.conftest_s3 import s3_storage_options
from tests.support.procs import wait_for


def _rec(step: int) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "loss": 1.0,
        "lr": 0.1,
        "ema_momentum": 0.99,
        "img_per_s": 1.0,
        "positives": 1.0,
        "total_steps": 9,
    }


def test_final_flush_on_a_stalled_store_gives_up_and_the_error_is_recorded(s3_url, fault_proxy):
    store = CheckpointStore(s3_url, s3_storage_options(fault_proxy.url), timeout_s=4.0)
    log = MetricsLog(store, "a1")
    log.append(_rec(1))
    assert log.flush(wait=True, timeout_s=60)
    fault_proxy.stall_for(600)  # longer than the test: every flush from now on hangs
    log.append(_rec(2))
    log.flush()
    assert not log.flush(wait=True, timeout_s=1.0)  # the stuck flush is left behind, not waited for
    assert log._thread is not None and log._thread.is_alive()
    wait_for("the stuck flush to fail", lambda: log.error is not None, 120, 0.05)
    assert "store" in log.error, log.error
    fault_proxy.passthrough()
    log.append(_rec(3))
    assert log.flush(wait=True, timeout_s=60)
    assert log.error is None
    lines = [json.loads(x) for x in store.read_aux("metrics/a1.000000.jsonl").decode().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]  # nothing lost once the store answered
    assert lines[-1]["store_error"].startswith("metrics flush failed: "), lines[-1]


def test_status_warns_when_a_running_trainers_newest_record_is_stale():
    now = time.time()
    p = Progress(trainer={"updated": now - 900, "step": 40}, metrics={"time": now - 400, "step": 45})
    assert p.record_time == now - 400
    row = {"run_id": "r1", "state": "RUNNING", "step": 45, "record_age_s": STALE_RECORD_S + 1}
    (line,) = checkpoint_warnings(row)
    assert "newest record (step 45)" in line and "may not reach its checkpoint store" in line
    assert checkpoint_warnings({**row, "record_age_s": STALE_RECORD_S - 1}) == []
    assert checkpoint_warnings({**row, "state": "COMPLETED"}) == []
