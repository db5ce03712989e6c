"""The kNN monitor during pretraining: it changes nothing the run trains, its records survive a resume
exactly once per step, ranks merge their nearest neighbours into one process's answer, bad specs and
data fail in one line, and ``pixpro status`` shows its newest result."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from cluster import render
from cluster.index import Index
from cluster.record import RunRecord, write_local
from cluster.status import collect
from launch import preflight
from launch.collectives import Collectives
from launch.monitor import KnnMonitor
from launch.preempt import EXIT_PREEMPTED
from launch.records import MetricsLog, knn_results, last_knn, read_metrics
from launch.sinks import scalars
from launch.store import CheckpointStore
from pixpro.demo_data import generate_demo_dataset
from pixpro.model import build_backbone
from schemas import MonitorSpec, hash_payload, load_spec, parse_spec, spec_hash
from tests.support import zygote
from tests.support.specs import MINIMAL, errors_of, with_value
from tests.support.trainer import (
    REPO,
    assert_identical,
    final_state,
    run_trainer,
    tiny_spec,
    trainer_env,
    write_spec,
)

EVERY = 4  # tiny_spec trains 10 steps: the monitor runs at steps 4 and 8
LOG_EVERY = 3  # records at 3, 6, 9 and 10 besides the monitor's own at 4 and 8


def monitored(data_root: Path, **overrides: Any) -> dict:
    monitor = {"data": str(data_root), "every_steps": EVERY, "train_samples": 15, "test_samples": 4, "k": 5}
    return tiny_spec(data_root, monitor=monitor, log_every_steps=LOG_EVERY, **overrides)


def knn_fields(records: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("knn_step"), r.get("knn_top1"), r.get("knn_top5")) for r in records]


# ------------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def unmonitored(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("off")
    res = run_trainer(write_spec(d / "spec.json", tiny_spec(data_root, log_every_steps=LOG_EVERY)), d / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    return final_state(str(d / "run" / "checkpoints"))


@pytest.fixture(scope="module")
def with_monitor(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("on")
    res = run_trainer(write_spec(d / "spec.json", monitored(data_root)), d / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    store = CheckpointStore(str(d / "run" / "checkpoints"))
    return final_state(store.url), read_metrics(store), res.stderr


@pytest.mark.slow
def test_a_run_with_the_monitor_ends_bitwise_as_one_without_and_records_it_at_its_steps(
    unmonitored, with_monitor
):
    state, records, stderr = with_monitor
    assert_identical(unmonitored, state)
    assert [r["step"] for r in records] == [3, 4, 6, 8, 9, 10]  # the monitor's steps get a record too
    assert [r["step"] for r in knn_results(records)] == [4, 8]
    assert stderr.count("kNN monitor at step") == 2
    for r in records:  # each record carries the newest result and the step it was measured at
        expected = None if r["step"] < EVERY else r["step"] // EVERY * EVERY
        assert r.get("knn_step") == expected
        assert expected is None or 0 <= r["knn_top1"] <= r["knn_top5"] <= 1


@pytest.mark.slow
def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one_monitor_records_included(
    tmp_path, data_root, with_monitor
):
    state, records, _ = with_monitor
    spec = write_spec(tmp_path / "spec.json", monitored(data_root))
    run = tmp_path / "run"
    res = run_trainer(spec, run, PIXPRO_STOP_AT_STEP="5")  # after the monitor's step 4, before a record
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-3000:]
    res = run_trainer(spec, run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 5" in res.stderr
    assert res.stderr.count("kNN monitor at step") == 1  # step 8: step 4's result is carried over
    assert_identical(state, final_state(str(run / "checkpoints")))
    resumed = read_metrics(CheckpointStore(str(run / "checkpoints")))
    assert knn_fields(resumed) == knn_fields(records)
    assert [r["step"] for r in knn_results(resumed)] == [4, 8]


# ------------------------------------------------------------------------- records across attempts
def test_an_attempt_that_repeats_steps_leaves_one_monitor_record_per_step(tmp_path):
    """Attempt A evaluated at steps 4 and 8 and died after its checkpoint at 6; attempt B resumes at 6,
    carries step 4's result and evaluates step 8 again: readers see step 8 once, B's."""
    store = CheckpointStore(str(tmp_path / "ckpt"))

    def record(step: int, knn: dict) -> dict:
        return {"step": step, "epoch": 0, "loss": 1.0, "lr": 0.1, "ema_momentum": 0.99, "img_per_s": 1.0,
                "positives": 1.0, "total_steps": 10, **knn}  # fmt: skip

    def result(step: int, top1: float) -> dict:
        return {"knn_top1": top1, "knn_top5": 1.0, "knn_step": step}

    first = MetricsLog(store, "a")
    for step in range(1, 10):
        first.append(record(step, result(8, 0.5) if step >= 8 else result(4, 0.25) if step >= 4 else {}))
    assert first.flush(wait=True)
    carried = last_knn(read_metrics(store), 6)
    assert carried == result(4, 0.25)
    time.sleep(0.01)  # the resumed attempt's records are newer
    second = MetricsLog(store, "b")
    for step in range(7, 11):
        second.append(record(step, result(8, 0.75) if step >= 8 else carried))
    assert second.flush(wait=True)
    records = read_metrics(store)
    assert [(r["step"], r["knn_top1"], r["attempt"]) for r in knn_results(records)] == [
        (4, 0.25, "a"),
        (8, 0.75, "b"),
    ]
    assert [r["step"] for r in records] == list(range(1, 11))


def test_tensorboard_and_wandb_get_the_monitor_at_its_own_step_only():
    base = {"step": 8, "loss": 1.0, "knn_top1": 0.5, "knn_top5": 0.75}
    assert scalars(base | {"knn_step": 8})["monitor/knn_top1"] == 0.5
    assert scalars(base | {"knn_step": 8})["monitor/knn_top5"] == 0.75
    assert "monitor/knn_top1" not in scalars(base | {"step": 9, "knn_step": 8})
    assert "monitor/knn_top1" not in scalars({"step": 8, "loss": 1.0})


# --------------------------------------------------------------------------------------- two ranks
def _ranks(data: Path, out: Path, nproc: int) -> dict:
    module = ["-m", "tests.support.monitor_ranks", str(data), str(out), "20"]
    launcher = ["-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={nproc}",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]  # fmt: skip
    cmd = [sys.executable, *(launcher if nproc > 1 else []), *module]
    res = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_ranks_merge_their_neighbours_into_the_answer_of_one(tmp_path):
    """31 training images, k = 20: each rank holds 15 or 16, so neither has k of its own and the global
    top 20 must come from both. One process equals ``pixpro eval --task knn``'s functions; two gloo ranks
    under torchrun equal one process."""
    data = tmp_path / "scenes"
    generate_demo_dataset(data, num_images=60, image_size=72, seed=2)
    one = _ranks(data, tmp_path / "one.json", 1)
    two = _ranks(data, tmp_path / "two.json", 2)
    assert (one["world"], two["world"]) == (1, 2)
    assert [one["top1"], one["top5"]] == one["reference"]
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])


def test_an_evaluation_leaves_every_generator_mode_and_statistic_as_it_found_them(tmp_path):
    """What the bitwise runs rely on, checked directly: the RNG streams, each module's train flag and
    BatchNorm's running statistics; and ``every_epochs`` counts in steps of the run's epoch."""
    generate_demo_dataset(tmp_path / "scenes", num_images=20, image_size=72, seed=3)
    spec = MonitorSpec(data=str(tmp_path / "scenes"), every_epochs=2)
    monitor = KnnMonitor(spec, 64, Collectives(), torch.device("cpu"))
    assert monitor.every(6) == 12
    torch.manual_seed(5)
    backbone, _ = build_backbone("resnet18", False)
    backbone.train()
    next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()  # one left in eval
    modes = [m.training for m in backbone.modules()]
    buffers = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    top1, top5 = monitor.evaluate(backbone, 12)
    assert 0 <= top1 <= top5 <= 1
    assert [m.training for m in backbone.modules()] == modes
    assert all(torch.equal(v, buffers[k]) for k, v in backbone.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng[0]) and (np.random.get_state()[1] == rng[1]).all()
    assert random.getstate() == rng[2]
    assert monitor.evaluate(backbone, 24) == (top1, top5)  # from the cached crops: the same answer


# ------------------------------------------------------------------------------------ bad input
def test_spec_errors_are_one_line_each():
    def bad(monitor: Any) -> list[str]:
        return errors_of(with_value(MINIMAL, "monitor", monitor))

    exactly_one = "monitor.every_epochs: set exactly one of monitor.every_steps and monitor.every_epochs"
    assert bad({"data": "/v"}) == [f"{exactly_one} (got None)"]
    assert bad({"data": "/v", "every_steps": 5, "every_epochs": 2}) == [f"{exactly_one} (got 2)"]
    assert bad({"data": "/v", "every_steps": 0}) == [
        "monitor.every_steps: Input should be greater than or equal to 1 (got 0)"
    ]
    lines = bad({"data": "/v", "every_epochs": 1, "k": 0, "temperature": 0, "extra": 1})
    assert len(lines) == 3 and [line.split(":")[0] for line in lines] == [
        "monitor.k", "monitor.temperature", "monitor.extra"
    ]  # fmt: skip
    assert bad({"every_steps": 3})[0].startswith("monitor.data: ")
    assert bad({"data": "ftp://host/x", "every_steps": 3})[0].startswith("monitor.data: unsupported scheme")


def test_the_monitor_is_outside_the_spec_hash():
    """It reads the weights and changes nothing: a resume may turn it on, off or change its cadence."""
    on = parse_spec(with_value(MINIMAL, "monitor", {"data": "/v", "every_epochs": 2}))
    assert on.monitor is not None and on.monitor.k == 20 and on.monitor.temperature == 0.07
    assert spec_hash(on) == spec_hash(parse_spec(MINIMAL))
    assert "monitor" not in hash_payload(on)


def test_the_example_imagenet_spec_turns_the_monitor_on():
    spec = load_spec(REPO / "launch" / "specs" / "imagenet_r50_100ep.json")
    assert spec.monitor is not None and spec.monitor.every_epochs == 2


def test_preflight_refuses_unreadable_or_unlabelled_monitor_data_in_one_line(tmp_path):
    def problem(data: str, **extra: Any) -> str:
        spec = parse_spec(
            {"data": {"root": str(tmp_path / "train"), **extra}, "monitor": {"data": data, "every_steps": 10}}
        )
        with pytest.raises(preflight.Problem) as info:
            preflight.check_monitor(spec)
        return str(info.value)

    missing = f"monitor.data: {tmp_path / 'none'} does not exist here (--no-preflight skips the check)"
    assert problem(str(tmp_path / "none")) == missing
    flat = tmp_path / "flat"
    generate_demo_dataset(tmp_path / "scenes", num_images=8, image_size=64, seed=0)
    (tmp_path / "scenes" / "images").rename(flat)  # images without class folders or masks
    assert (
        problem(str(flat))
        == f"monitor.data: {flat}: no class sub-folders (images must sit in one folder per class)"
    )
    good = tmp_path / "good"
    generate_demo_dataset(good, num_images=20, image_size=64, seed=0)
    ok = parse_spec(
        {"data": {"root": str(tmp_path / "train")}, "monitor": {"data": str(good), "every_steps": 1}}
    )
    assert re.fullmatch(r"\d+ training and \d+ held-out images in \d classes", preflight.check_monitor(ok))
    # the demo scenes the first attempt generates into data.root: nothing to read yet, nothing wrong
    demo = str(tmp_path / "demo")
    later = parse_spec(
        {"data": {"root": demo, "demo": {}, "crop_size": 64}, "monitor": {"data": demo, "every_steps": 1}}
    )
    assert preflight.check_monitor(later).startswith("the demo scenes")


@pytest.mark.slow
def test_the_preflight_child_and_the_trainer_exit_2_with_one_line(tmp_path, data_root):
    spec = tiny_spec(data_root, monitor={"data": str(tmp_path / "none"), "every_steps": 2})
    path = write_spec(tmp_path / "spec.json", spec)
    proc = zygote.run(
        [sys.executable, "-m", "launch.preflight", str(path)], capture_output=True, text=True, timeout=300,
        cwd=REPO, env=trainer_env(),
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [
        f"monitor.data: {tmp_path / 'none'} does not exist here (--no-preflight skips the check)"
    ]
    res = run_trainer(path, tmp_path / "run")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"monitor.data: data folder {tmp_path / 'none'} does not exist" in res.stderr


# ------------------------------------------------------------------------------------------- status
def test_status_shows_the_newest_knn_result_and_its_step(tmp_path):
    home, url = tmp_path / "home", str(tmp_path / "ckpt")
    rec = RunRecord(
        run_id="mon-20260101-000000-abcd", name="mon", spec_hash="0" * 64, created=time.time(),
        executor="local", run_dir=str(home / "runs" / "mon"), workdir=str(home), checkpoint_url=url,
        resources={"nodes": 1, "gpus_per_node": 0},
    )  # fmt: skip
    write_local(rec)
    Index(home).put(rec)
    log = MetricsLog(CheckpointStore(url), "local-1")
    base = {"epoch": 0, "loss": 1.0, "lr": 0.1, "ema_momentum": 0.99, "img_per_s": 1.0, "positives": 1.0,
            "total_steps": 20}  # fmt: skip
    log.append(base | {"step": 8, "knn_top1": 0.4125, "knn_top5": 0.8, "knn_step": 8})
    log.append(base | {"step": 9, "knn_top1": 0.4125, "knn_top5": 0.8, "knn_step": 8})
    assert log.flush(wait=True)
    (row,), _ = collect([rec])
    assert (row["knn_top1"], row["knn_top5"], row["knn_step"]) == (0.4125, 0.8, 8)
    out = io.StringIO()
    Console(file=out, width=250).print(render.table([row]))
    assert "KNN@1" in out.getvalue() and "41.2% @8" in out.getvalue()
