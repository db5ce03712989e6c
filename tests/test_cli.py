"""Fast tests of the ``pixpro`` CLI: validation, dry runs, refusals, status (50 runs, no torch).

They use the real console script and the real local SLURM cluster for checks that ask it
(``sbatch --test-only``, ``sinfo``), but never start a training job.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.attempts import ACTIVE, STATES, AttemptState, follow_exit_code, local_state, slurm_state
from cluster.local import LocalJob
from cluster.record import RunRecord
from cluster.slurm import HistoryLine, SlurmJob, check_partitions, gpu_count, parse_sinfo
from schemas import SpecError, load_spec
from schemas.contract import STATUS_FILE, TENSORBOARD_DIR, one_line, wandb_run_id
from tests.support.cli import (
    PIXPRO,
    assert_one_line_error,
    cli,
    run_cli,
    status_json,
    which_or_fail,
    write_spec,
)
from tests.support.cli import cluster_tiny_spec as tiny_spec
from tests.support.runs import fake_runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"  # not created: commands that must write nothing leave it absent


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    name = f"t{uuid.uuid4().hex[:10]}"  # unique: squeue -n NAME shows whether anything was queued
    return write_spec(tmp_path / "tiny.json", tiny_spec(tmp_path / "data", name=name))


def queued(name: str) -> str:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


# ----------------------------------------------------------------------------------------- validate
def test_version(home: Path) -> None:
    proc = cli("--version", home=home)
    assert proc.returncode == 0 and proc.stdout.startswith("pixpro "), proc


def test_validate_prints_resolved_spec(home: Path, spec_file: Path) -> None:
    proc = cli("validate", str(spec_file), home=home)
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["optim"]["optimizer"] == "lars"  # a default filled in
    assert resolved["loss"]["positive_threshold"] == 0.7
    assert load_spec(spec_file).model_dump(mode="json") == resolved
    assert not home.exists()


def test_validate_typo_missing_file_and_non_json(home: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "data")
    spec["optim"]["lr"] = 0.1  # typo of base_lr
    line = assert_one_line_error(cli("validate", str(write_spec(tmp_path / "typo.json", spec)), home=home), 2)
    assert "optim.lr" in line and "base_lr" in line, line

    line = assert_one_line_error(cli("validate", str(tmp_path / "missing.json"), home=home), 2)
    assert "no such file" in line

    (tmp_path / "bad.json").write_text('{"name": "x",,}')
    line = assert_one_line_error(cli("validate", str(tmp_path / "bad.json"), home=home), 2)
    assert "invalid JSON" in line

    spec = tiny_spec(tmp_path / "data")
    spec["optim"]["lr"], spec["data"]["batch_size"] = 0.1, 0
    proc = cli("validate", str(write_spec(tmp_path / "two.json", spec)), home=home)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not home.exists()


def test_imagenet_recipe_validates() -> None:
    spec = load_spec(REPO / "launch/specs/imagenet_r50_100ep.json")
    res, optim = spec.resources, spec.optim
    global_batch = res.nodes * res.gpus_per_node * spec.data.batch_size
    assert (res.gpus_per_node * res.nodes, spec.data.batch_size, global_batch) == (8, 128, 1024)
    assert (optim.optimizer, optim.base_lr, optim.lr_scaling, optim.epochs) == ("lars", 1.0, "linear", 100)
    assert optim.base_lr * global_batch / 256 == 4.0  # peak LR of the paper
    assert spec.precision == "bf16" and spec.model.backbone == "resnet50"
    assert (spec.checkpoint.url or "").startswith("s3://")
    assert not any(k in json.dumps(spec.checkpoint.storage_options).lower() for k in ("secret", "key"))


# --- fuzz: every malformed spec is exit 2, one line per problem, no traceback ---------------------
_BASE = tiny_spec(Path("/tmp/pixpro-fuzz-data"))
_NUMERIC = [
    ("seed",),
    ("data", "batch_size"),
    ("data", "crop_size"),
    ("optim", "base_lr"),
    ("optim", "epochs"),
    ("resources", "nodes"),
    ("resources", "gpus_per_node"),
    ("model", "projector_out"),
    ("checkpoint", "keep_last"),
    ("optim", "momentum"),
    ("log_every_steps",),
]
_OBJECTS = [
    (),
    ("data",),
    ("data", "demo"),
    ("model",),
    ("optim",),
    ("checkpoint",),
    ("resources",),
    ("loss",),
]
_ANY = [*_NUMERIC, ("precision",), ("name",), ("optim", "optimizer"), ("resources", "signal"), ("data",)]
_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8)
)


def _get(spec: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The object at ``path``, created if absent; the top level where an earlier mutation broke the path."""
    node = spec
    for key in path:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return spec
    return node


def _new_key(taken: set[str], key: str) -> bool:
    return key not in taken and not key.startswith("$")  # "$schema"/"$comment" are annotations


@st.composite
def malformed_spec(draw: st.DrawFn) -> bytes:
    """Valid tiny spec plus 1-3 mutations each of which alone makes it invalid."""
    spec = copy.deepcopy(_BASE)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["unknown_key", "bad_object", "negative", "not_a_number", "drop_data", "nan"])
        )
        if kind == "unknown_key":
            parent = _get(spec, draw(st.sampled_from(_OBJECTS))) if "data" in spec else spec
            key = draw(st.text(min_size=1, max_size=12).filter(functools.partial(_new_key, set(parent))))
            parent[key] = draw(_json_leaf)
        elif kind == "bad_object":
            path = draw(st.sampled_from(_ANY))
            if "data" in spec or path[0] != "data":
                _get(spec, path[:-1])[path[-1]] = {"!" + draw(st.text(max_size=6)): draw(_json_leaf)}
            else:
                spec["data"] = []
        elif kind == "negative" and "data" in spec:
            path = draw(st.sampled_from(_NUMERIC))
            _get(spec, path[:-1])[path[-1]] = draw(st.integers(max_value=-1))
        elif kind == "not_a_number" and "data" in spec:
            path = draw(st.sampled_from(_NUMERIC))
            _get(spec, path[:-1])[path[-1]] = "x" + draw(st.text(max_size=6))
        elif kind == "nan" and "data" in spec:
            path = draw(st.sampled_from([("optim", "base_lr"), ("optim", "momentum"), ("loss", "ppm_gamma")]))
            _get(spec, path[:-1])[path[-1]] = draw(
                st.sampled_from([float("nan"), float("inf"), float("-inf")])
            )
        else:
            spec.pop("data", None)
    text = json.dumps(spec).encode()
    how = draw(st.sampled_from(["json", "json", "json", "truncated", "not_object", "binary"]))
    if how == "truncated":
        return text[: draw(st.integers(1, len(text) - 1))]
    if how == "not_object":
        return json.dumps(draw(st.lists(_json_leaf, max_size=3) | _json_leaf)).encode()
    if how == "binary":
        return b"\xff\xfe" + draw(st.binary(max_size=20))
    return text


def test_fuzz_1000_malformed_specs_exit_2_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    checked = 0

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(body=malformed_spec())
    def check(body: bytes) -> None:
        nonlocal checked
        path.write_bytes(body)
        with pytest.raises(SpecError) as expected:
            load_spec(path)
        code, out, err = run_cli("validate", str(path))
        assert code == 2, (code, out, err)
        assert err.splitlines() == [one_line(f"pixpro: {p}") for p in expected.value.problems]
        assert "Traceback" not in err and out == ""
        checked += 1

    check()
    assert checked >= 1000, checked


# ----------------------------------------------------------------------------------------- submit
@pytest.mark.cluster
def test_dry_run_prints_sbatch_and_torchrun_and_writes_nothing(home: Path, spec_file: Path) -> None:
    which_or_fail("sbatch", "sinfo")
    name = json.loads(spec_file.read_text())["name"]
    proc = cli("submit", "--dry-run", "--nodes", "2", "--gpus", "2", str(spec_file), home=home)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=2" in out
    assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --requeue" in out
    assert "#SBATCH --signal=USR2@60" in out and "export SUBMITIT_PREEMPT_SIGNAL=USR2" in out
    assert "sbatch --test-only: sbatch: Job" in out
    # CPUs for every rank and DataLoader worker (capped at a node's CPUs), for the job and its srun step
    cpus = next(ln for ln in out.splitlines() if ln.startswith("#SBATCH --cpus-per-task="))
    srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    assert cpus.split("--")[1] in srun and int(cpus.split("=")[1]) >= 2, (cpus, srun)
    torchrun = next(line for line in out.splitlines() if "-m launch.run" in line)
    for part in (
        "--nnodes 2",
        "--nproc-per-node 2",
        "--rdzv-backend c10d",
        '--rdzv-endpoint "$FIRST_HOST:$PORT"',
        '--rdzv-id "$SLURM_JOB_ID"',
        '--rdzv-conf "is_host=$IS_HOST"',
        "--max-restarts 0",
        "PIXPRO_SIGNAL=USR2",
    ):
        assert part in torchrun, (part, torchrun)
    resolved = json.loads(out.split("# resolved spec\n", 1)[1].split("\n\n# sbatch script", 1)[0])
    assert resolved["resources"]["nodes"] == 2 and resolved["checkpoint"]["url"].endswith("/checkpoints")
    assert not home.exists() and queued(name) == ""

    one = cli("submit", "--dry-run", "--nodes", "1", "--gpus", "2", str(spec_file), home=home)
    assert one.returncode == 0, one.stderr
    assert "--rdzv-endpoint 127.0.0.1:0 " in one.stdout and "--rdzv-conf is_host=1" in one.stdout

    proc = cli("submit", "--dry-run", "--executor", "local", str(spec_file), home=home)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH" not in proc.stdout and "--nnodes 1 --nproc-per-node 1" in proc.stdout
    assert "--rdzv-endpoint 127.0.0.1:0 " in proc.stdout and "--rdzv-conf is_host=1" in proc.stdout
    assert not home.exists()


@pytest.mark.cluster
def test_impossible_resources_exit_2_and_submit_nothing(home: Path, spec_file: Path, tmp_path: Path) -> None:
    which_or_fail("sbatch", "sinfo")
    name = json.loads(spec_file.read_text())["name"]
    line = assert_one_line_error(cli("submit", "--gpus", "8", str(spec_file), home=home), 2)
    assert "--gpus 8" in line and "at most 2 GPUs" in line, line

    spec = tiny_spec(tmp_path / "data", name=name, resources__partition="nosuchpart")
    line = assert_one_line_error(cli("submit", str(write_spec(tmp_path / "p.json", spec)), home=home), 2)
    assert "nosuchpart" in line and "available: cpu, high" in line, line

    line = assert_one_line_error(cli("submit", "--nodes", "3", str(spec_file), home=home), 2)
    assert "--nodes 3" in line, line
    line = assert_one_line_error(cli("submit", "--nodes", "0", str(spec_file), home=home), 2)
    assert line.startswith("pixpro: --nodes (resources.nodes):"), line
    line = assert_one_line_error(
        cli("submit", "--executor", "local", "--nodes", "2", str(spec_file), home=home), 2
    )
    assert "one node" in line
    assert not home.exists() and queued(name) == ""


def test_partition_without_gpus_is_one_clear_line() -> None:
    parts = parse_sinfo("node1|cpu*|(null)|up\nnode2|cpu*|(null)|up\nnode3|gpu|gpu:a100:4(S:0-1)|up\n")
    assert gpu_count("gpu:a100:4(S:0-1),gpu:2,nvme:1") == 6 and parts["gpu"].nodes == {"node3": 4}
    spec = load_spec(write_spec(Path(tempfile.mkdtemp()) / "s.json", tiny_spec(Path("/tmp/d"))))
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus_per_node": 8})})
    with pytest.raises(Exception, match="partition 'cpu' has no GPUs") as err:
        check_partitions(spec, parts)
    assert getattr(err.value, "code", None) == 2


NO_SBATCH = {"PATH": "/nonexistent", "CUDA_VISIBLE_DEVICES": ""}  # a laptop: no SLURM, no GPU


def test_dry_run_without_sbatch_previews_slurm_and_says_nothing_was_checked(
    home: Path, spec_file: Path
) -> None:
    proc = cli("submit", "--dry-run", "--set", "data.batch_size=2", str(spec_file), home=home, env=NO_SBATCH)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "#SBATCH --nodes=1" in out and "#SBATCH --requeue" in out and "-m launch.run" in out
    assert "# sbatch is not on PATH: nothing was checked against a cluster" in out
    assert "sbatch --test-only" not in out and "# preflight: not run by --dry-run" in out
    resolved = json.loads(out.split("# resolved spec\n", 1)[1].split("\n\n# sbatch script", 1)[0])
    assert resolved["data"]["batch_size"] == 2  # --set is recorded in the resolved spec
    proc = cli(
        "submit", "--dry-run", "--json", "--executor", "slurm", str(spec_file), home=home, env=NO_SBATCH
    )
    payload = json.loads(proc.stdout)
    assert proc.returncode == 0 and payload["cluster_checked"] is False and "#SBATCH" in payload["sbatch"]
    line = assert_one_line_error(
        cli("submit", "--executor", "slurm", str(spec_file), home=home, env=NO_SBATCH), 2
    )
    assert "sbatch is not on PATH" in line
    assert not home.exists()


def test_dry_run_previews_when_no_controller_answers(home: Path, spec_file: Path) -> None:
    """SLURM's client installed but no controller to ask (no SLURM_CONF: ``sinfo`` fails at once with a
    DNS SRV lookup error): a preview still renders the plan and says in one line what it could not
    check; a real submission still refuses."""
    which_or_fail("sinfo")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"} | {"PIXPRO_HOME": str(home)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PIXPRO, *args], capture_output=True, text=True, timeout=120, env=env)

    proc = run("submit", "--dry-run", "--executor", "slurm", str(spec_file))
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=1" in proc.stdout and "-m launch.run" in proc.stdout
    unchecked = [ln for ln in proc.stdout.splitlines() if ln.startswith("# not checked against the cluster")]
    assert len(unchecked) == 1 and "sinfo failed" in unchecked[0], proc.stdout
    assert "sbatch --test-only" not in proc.stdout and "Traceback" not in proc.stderr
    payload = json.loads(run("submit", "--dry-run", "--json", "--executor", "slurm", str(spec_file)).stdout)
    assert payload["cluster_checked"] is False and "sinfo failed" in payload["unchecked"]
    line = assert_one_line_error(run("submit", "--executor", "slurm", str(spec_file)), 1)
    assert "sinfo failed" in line  # and what to do instead:
    assert line.endswith("(is slurmctld up? --executor local runs it on this machine)"), line
    assert not home.exists()


def test_set_overrides_on_validate(home: Path, spec_file: Path) -> None:
    proc = cli(
        "validate",
        str(spec_file),
        "--set",
        "data.batch_size=8",
        "--set",
        "model.backbone=resnet34",
        home=home,
    )
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert (resolved["data"]["batch_size"], resolved["model"]["backbone"]) == (8, "resnet34")
    line = assert_one_line_error(
        cli("validate", str(spec_file), "--set", "data.batch_size=true", home=home), 2
    )
    assert line == (
        "pixpro: data.batch_size: Input should be a valid integer (got True) (from --set data.batch_size)"
    )
    line = assert_one_line_error(cli("validate", str(spec_file), "--set", "nokey", home=home), 2)
    assert line.startswith("pixpro: --set nokey: expected KEY.PATH=VALUE")
    assert not home.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", ""], "ID '': not a run or job id"),
        (["status", "--", "-rf"], "ID '-rf': not a run or job id"),
        (["logs", "a b"], "ID 'a b': not a run or job id"),
        (["cancel", "x" * 500], "not a run or job id"),
        (["resume", "../etc"], "ID '../etc': not a run or job id"),
        (["status", "--watch", "--interval", "inf"], "--interval inf: must be a number of seconds"),
        (["status", "--watch", "--interval", "nan"], "--interval nan: must be a number of seconds"),
        (["status", "--watch", "--interval", "0.1"], "--interval 0.1: must be a number of seconds"),
        (["submit", "--gpus", "65", "SPEC"], "--gpus (resources.gpus_per_node): Input should be less than"),
        (
            ["submit", "--executor", "local", "--gpus", "8", "SPEC"],
            "--gpus 8: this machine has 0 visible CUDA",
        ),
        (["validate", "/tmp/" + "y" * 300 + ".json"], "File name too long"),
        (["validate", "/"], "/: not a file"),
    ],
)
def test_usage_errors_are_one_line_exit_2_and_write_nothing(
    home: Path, spec_file: Path, args: list[str], expected: str
) -> None:
    args = [str(spec_file) if a == "SPEC" else a for a in args]
    line = assert_one_line_error(cli(*args, home=home, env=NO_SBATCH, timeout=30), 2)
    assert expected in line and len(line) <= 208, line
    assert not home.exists()


def test_megabyte_unknown_key_is_not_echoed(home: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "data")
    spec["optim"]["z" * 200_000] = 1
    line = assert_one_line_error(cli("validate", str(write_spec(tmp_path / "k.json", spec)), home=home), 2)
    assert len(line) <= 208 and "zzzzzzzzzz" in line and "z" * 300 not in line, len(line)


@pytest.mark.slow
def test_validate_deep_runs_the_preflight_in_a_child(home: Path, spec_file: Path, tmp_path: Path) -> None:
    proc = cli("validate", "--deep", str(spec_file), home=home, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("pixpro: preflight passed in ") and json.loads(proc.stdout)["name"]
    spec = tiny_spec(tmp_path / "nothing-here", data__demo=None)
    bad = write_spec(tmp_path / "bad.json", spec)
    line = assert_one_line_error(cli("validate", "--deep", str(bad), home=home, timeout=400), 2)
    assert line.startswith("pixpro: preflight: data.root: ") and "does not exist" in line
    line = assert_one_line_error(cli("submit", "--executor", "local", str(bad), home=home, env=NO_SBATCH), 2)
    assert line.startswith("pixpro: preflight: data.root: ")
    assert not home.exists()  # refused by the preflight: nothing written, nothing started


def test_validate_imports_no_torch(home: Path, spec_file: Path) -> None:
    cmd = [sys.executable, "-X", "importtime", "-m", "cluster.cli", "validate", str(spec_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PIXPRO_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "schemas" in imported and not imported & {"torch", "torchvision", "numpy", "pixpro"}


SINFO = """\
node1|cpu*|(null)|up|4|8000
node2|cpu*|(null)|up|4|8000
node3|gpu|gpu:a100:4(S:0-1)|up
node4|gpu|gpu:a100:4(S:0-1)|up
node5|gpu|gpu:2,nvme:1|up
node1|preempt|(null)|up
garbage line without fields
"""


@pytest.mark.parametrize(
    ("resources", "problem"),
    [
        ({"partition": "gpu", "gpus_per_node": 4, "nodes": 2}, None),
        ({"partition": "gpu", "gpus_per_node": 2, "nodes": 3}, None),
        ({"gpus_per_node": 0, "nodes": 2}, None),  # the default partition (cpu*)
        ({"partition": "cpu,gpu", "gpus_per_node": 4}, None),  # any of several partitions may fit
        ({"partition": "gpu", "gpus_per_node": 8}, "--gpus 8: partition 'gpu' has at most 4 GPUs per node"),
        (
            {"partition": "gpu", "gpus_per_node": 4, "nodes": 3},
            "--nodes 3: partition 'gpu' has only 2 node(s)",
        ),
        ({"gpus_per_node": 1}, "--gpus 1: partition 'cpu' has no GPUs (no gres/gpu)"),
        ({"cpus_per_task": 4, "mem_gb": 7}, None),
        (
            {"cpus_per_task": 64},
            "resources.cpus_per_task 64: partition 'cpu' has at most 4 CPUs and 7.8 GB per node",
        ),
        ({"mem_gb": 16}, "resources.mem_gb 16: partition 'cpu' has at most 4 CPUs and 7.8 GB per node"),
        ({"partition": "gpu", "cpus_per_task": 64, "mem_gb": 900}, None),  # sinfo said nothing of them
        ({"nodes": 3}, "--nodes 3: partition 'cpu' has only 2 node(s)"),
        (
            {"partition": "nosuch"},
            "resources.partition: no partition 'nosuch' on this cluster (available: cpu, gpu",
        ),
    ],
)
def test_check_partitions_against_recorded_sinfo(resources: dict[str, Any], problem: str | None) -> None:
    parts = parse_sinfo(SINFO)
    assert set(parts) == {"cpu", "gpu", "preempt"} and parts["cpu"].default and not parts["gpu"].default
    assert parts["gpu"].nodes == {"node3": 4, "node4": 4, "node5": 2}
    spec = load_spec(write_spec(Path(tempfile.mkdtemp()) / "s.json", tiny_spec(Path("/tmp/d"))))
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update=resources)})
    if problem is None:
        check_partitions(spec, parts)
        return
    with pytest.raises(Exception) as err:
        check_partitions(spec, parts)
    assert str(err.value).startswith(problem) and getattr(err.value, "code", None) == 2, str(err.value)


def test_check_partitions_without_a_default_or_any_partition() -> None:
    spec = load_spec(write_spec(Path(tempfile.mkdtemp()) / "s.json", tiny_spec(Path("/tmp/d"))))
    with pytest.raises(Exception, match="no default partition") as err:
        check_partitions(spec, parse_sinfo("node3|gpu|gpu:4|up\n"))
    assert getattr(err.value, "code", None) == 2
    with pytest.raises(Exception, match="sinfo lists no partitions") as err:
        check_partitions(spec, parse_sinfo(""))
    assert getattr(err.value, "code", None) == 1


def test_checkpoint_folder_of_another_run_is_refused_and_kept(
    home: Path, tmp_path: Path, monkeypatch
) -> None:
    """Refused before the preflight's seconds (a usage error never waits for them), and nothing is
    written."""
    from cluster import runs

    taken = tmp_path / "ckpt"
    taken.mkdir()
    original = b'{"run_id": "other-run-1234"}\n'
    (taken / "run.json").write_bytes(original)
    spec = tiny_spec(tmp_path / "data", checkpoint__url=str(taken))
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    monkeypatch.setattr(runs, "run_preflight", lambda *a, **k: pytest.fail("the preflight was started"))
    code, _, err = run_cli("submit", "--executor", "local", str(write_spec(tmp_path / "s.json", spec)))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("pixpro: "), (code, err)
    assert "other-run-1234" in err and "pixpro resume" in err
    assert (taken / "run.json").read_bytes() == original and sorted(p.name for p in taken.iterdir()) == [
        "run.json"
    ]
    assert not (home / "runs").exists()


# ----------------------------------------------------------------------------------------- status
def test_status_without_runs_and_unknown_ids(home: Path) -> None:
    proc = cli("status", home=home)
    assert proc.returncode == 0 and "No runs yet" in proc.stdout, proc
    proc = cli("status", "--json", home=home)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    for cmd in (["status", "nope-123"], ["logs", "nope-123"], ["resume", "nope-123"], ["cancel", "4242424"]):
        line = assert_one_line_error(cli(*cmd, home=home), 3)
        assert "nope-123" in line or "4242424" in line
    assert not home.exists()


@pytest.fixture
def fifty_runs(home: Path) -> list[RunRecord]:
    return fake_runs(home, 50)


def test_status_of_50_runs_asks_slurm_once_and_is_complete(
    home: Path, fifty_runs: list[RunRecord], tmp_path: Path
) -> None:
    """One ``squeue`` and one ``sacct`` for all runs, whatever their number: what keeps ``pixpro status``
    fast on a login node (its latency is measured by ``benches/bench_status.py``, not here)."""
    calls = tmp_path / "calls.log"
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in ("squeue", "sacct"):  # log the call, then run the real command (if there is one)
        shim = shims / tool
        shim.write_text(f'#!/bin/sh\necho {tool} >> {calls}\nPATH="$REAL_PATH" exec {tool} "$@"\n')
        shim.chmod(0o755)
    env = {"PATH": f"{shims}:{os.environ['PATH']}", "REAL_PATH": os.environ["PATH"]}
    proc = cli("status", home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    for rec in fifty_runs:
        assert rec.run_id in proc.stdout
    assert sorted(calls.read_text().split()) == ["sacct", "squeue"]  # 10 of the 50 runs are SLURM jobs

    rows = {r["run_id"]: r for r in json.loads(cli("status", "--json", home=home).stdout)}
    assert len(rows) == 50
    expect = {0: "COMPLETED", 75: "PREEMPTED", 1: "FAILED"}
    for i, rec in enumerate(fifty_runs):
        row = rows[rec.run_id]
        if rec.executor == "slurm":  # ids SLURM never saw, submitted an hour ago
            assert row["state"] == "UNKNOWN", row
        else:
            assert row["state"] == expect[(0, 75, 1, 0)[i % 4]], row
        assert row["step"] in (6, 12) and row["total_steps"] == 12 and row["checkpoint_step"] == row["step"]
        assert row["lr"] == pytest.approx(0.01 * row["step"]) and row["img_per_s"] == 10.0 + row["step"]
        assert 0 <= row["checkpoint_age_s"] < 120  # committed when the fixture ran
        assert row["tensorboard_dir"] == str(Path(rec.run_dir) / TENSORBOARD_DIR)
        assert row["wandb_run_id"] == wandb_run_id(rec.run_id)

    one = json.loads(cli("status", fifty_runs[3].attempts[0], "--json", home=home).stdout)
    assert one["run_id"] == fifty_runs[3].run_id


@pytest.mark.parametrize("slurm", ["unreachable", "not installed"])
def test_status_says_when_slurm_did_not_answer(
    home: Path, fifty_runs: list[RunRecord], tmp_path: Path, slurm: str
) -> None:
    """A SLURM client that cannot reach SLURM (here: an empty config, so it fails at once; a missing one
    makes it look for the controller in DNS for a minute), or no SLURM client at all (a laptop reading the
    run registry), is not a SLURM that has no such job: those runs are UNKNOWN because SLURM did not
    answer, never PENDING, and the rest of the table is still there, with one warning line per command."""
    empty = tmp_path / "slurm.conf"
    empty.touch()
    env = {"SLURM_CONF": str(empty)} if slurm == "unreachable" else {"PATH": str(tmp_path / "no-slurm")}
    proc = cli("status", "--json", home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {r["run_id"]: r for r in json.loads(proc.stdout)}
    assert len(rows) == 50
    for rec in fifty_runs:
        if rec.executor == "slurm":
            row = rows[rec.run_id]
            assert (row["state"], row["reason"]) == ("UNKNOWN", "squeue and sacct did not answer"), row
            assert row["step"] in (6, 12)  # what the trainer left is read all the same
    warnings = proc.stderr.strip().splitlines()
    assert [w.split(":")[:3] for w in warnings] == [
        ["pixpro", " warning", " squeue failed"],
        ["pixpro", " warning", " sacct failed"],
    ], warnings


def test_a_job_slurm_did_not_answer_for_is_unknown_even_when_just_submitted() -> None:
    st = slurm_state(SlurmJob("123", unanswered=("squeue",)), None, cancelled=False, recent=True)
    assert (st.state, st.reason) == ("UNKNOWN", "squeue did not answer")
    assert slurm_state(SlurmJob("123"), None, cancelled=False, recent=True).state == "PENDING"  # answered


def test_status_never_imports_torch(home: Path, fifty_runs: list[RunRecord]) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cluster.cli import app\n"
        "r = CliRunner().invoke(app, ['status'])\n"
        "assert r.exit_code == 0, r.stderr\n"
        "heavy = ('torch', 'torchvision', 'submitit', 'pixpro', 's3fs', 'numpy')\n"
        "found = [m for m in heavy if m in sys.modules]\n"
        "found += [m for m in sys.modules if m.startswith('launch.') and not m.startswith('launch.store')]\n"
        "print(sorted(found))\n"
    )
    env = {"PIXPRO_HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
    cmd = [sys.executable, "-X", "importtime", "-m", "cluster.cli", "status"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "cluster" in imported


# ----------------------------------------------------------------------------------------- states
def _hist(*states: tuple[str, int]) -> list[HistoryLine]:
    return [HistoryLine(s, code, 0, 0.0, 0.0) for s, code in states]


def test_preempted_is_never_failed() -> None:
    trainer = {"state": "preempted", "attempt": "77.1"}
    cases = [
        (SlurmJob("77", "PENDING", "BeginTime", _hist(("PREEMPTED", 0))), None, "REQUEUED"),
        (SlurmJob("77", "RUNNING", "", _hist(("PREEMPTED", 0), ("REQUEUED", 0))), None, "RUNNING"),
        (SlurmJob("77", None, "", _hist(("FAILED", 75))), None, "PREEMPTED"),
        (SlurmJob("77", None, "", _hist(("PREEMPTED", 0), ("FAILED", 1))), trainer, "PREEMPTED"),
        (SlurmJob("77", "COMPLETED", "", _hist(("COMPLETED", 0))), trainer, "PREEMPTED"),
        (SlurmJob("77", None, "", _hist(("FAILED", 1))), {"state": "preempted", "attempt": "78.0"}, "FAILED"),
        (
            SlurmJob("77", None, "", _hist(("PREEMPTED", 0), ("COMPLETED", 0))),
            {"state": "completed"},
            "COMPLETED",
        ),
        (SlurmJob("77", "PENDING", "Resources", []), None, "PENDING"),
    ]
    for job, status, want in cases:
        got = slurm_state(job, status, cancelled=False, recent=False)
        assert got.state == want, (job, status, got)
    assert (
        follow_exit_code(AttemptState("PREEMPTED")) == 75 and follow_exit_code(AttemptState("COMPLETED")) == 0
    )
    assert follow_exit_code(AttemptState("FAILED", exit_code=2)) == 2


def test_a_diverged_attempt_is_diverged_not_failed() -> None:
    """The trainer stopped the attempt on non-finite steps (exit 1 by design: nothing to restart or
    requeue): status says DIVERGED with the trainer's one line, on SLURM and on the local executor."""
    why = (
        "diverged: 3 steps in a row had non-finite gradients or loss; the last committed checkpoint is step 3"
    )
    trainer = {"state": "diverged", "attempt": "77.0", "diverged": why}
    got = slurm_state(SlurmJob("77", None, "", _hist(("FAILED", 1))), trainer, cancelled=False, recent=False)
    assert (got.state, got.reason) == ("DIVERGED", why)
    assert follow_exit_code(got) == 1
    other = {**trainer, "attempt": "78.0"}  # another job's record says nothing about this one
    assert slurm_state(SlurmJob("77", None, "", _hist(("FAILED", 1))), other, False, False).state == "FAILED"
    local = LocalJob("local-1", None, 0.0, 1.0, 1)
    assert local_state(local, {**trainer, "attempt": "local-1"}, cancelled=False).state == "DIVERGED"
    assert "DIVERGED" in STATES and "DIVERGED" not in ACTIVE


def test_cancel_claims_only_what_it_stopped(home: Path) -> None:
    """A failed attempt keeps its failure (nothing to stop); a preempted one waiting for a resume is
    cancelled; an attempt whose state SLURM did not give may be running: nothing is marked, exit 1."""
    slurm, preempted, failed = fake_runs(home, 3)
    no_slurm = {"PATH": str(home / "no-bin")}  # squeue and sacct do not answer
    proc = cli("cancel", failed.run_id, home=home, env=no_slurm)
    assert proc.returncode == 0 and "has nothing to cancel" in proc.stdout, proc.stderr
    assert status_json(home, failed.run_id, env=no_slurm)["state"] == "FAILED"
    proc = cli("cancel", preempted.run_id, home=home, env=no_slurm)
    assert proc.returncode == 0 and f"job(s) {preempted.latest_job}" in proc.stdout, proc.stderr
    assert status_json(home, preempted.run_id, env=no_slurm)["state"] == "CANCELLED"
    line = assert_one_line_error(cli("cancel", slurm.run_id, home=home, env=no_slurm), 1)
    assert "is unknown" in line and "nothing was cancelled" in line, line
    assert status_json(home, slurm.run_id, env=no_slurm)["state"] == "UNKNOWN"


def test_an_attempt_that_finished_before_the_cancel_reached_it_is_completed() -> None:
    """``pixpro cancel`` signals a running attempt and marks it; one that was finishing ends COMPLETED
    (exit 0, no preemption stop) and says so, on SLURM and on the local executor."""
    done = SlurmJob("77", None, "", _hist(("COMPLETED", 0)))
    assert slurm_state(done, {"state": "completed"}, cancelled=True, recent=False).state == "COMPLETED"
    stopped = {"state": "preempted", "attempt": "77.0"}
    assert slurm_state(done, stopped, cancelled=True, recent=False).state == "CANCELLED"
    assert local_state(LocalJob("local-1", None, 0.0, 1.0, 0), None, cancelled=True).state == "COMPLETED"
    assert local_state(LocalJob("local-1", None, 0.0, 1.0, 75), None, cancelled=True).state == "CANCELLED"


def test_console_script_usage_errors_are_one_line(home: Path) -> None:
    for args in (["bogus"], ["submit", "--nodes", "x", "s.json"], ["status", "--interval", "0"]):
        assert_one_line_error(cli(*args, home=home), 2)
    assert Path(PIXPRO).exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_executor_follow_runs_to_completion(home: Path, spec_file: Path, tmp_path: Path) -> None:
    """The README demo path (``submit --executor local --follow``) on the tiny spec: one CPU rank."""
    proc = cli(
        "submit", "--executor", "local", "--follow", str(spec_file), home=home, cwd=tmp_path, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "completed at step 20 of 20" in proc.stdout and "ended: COMPLETED" in proc.stderr
    row = json.loads(cli("status", "--json", home=home).stdout)[0]
    assert (row["state"], row["step"], row["checkpoint_step"], row["executor"]) == (
        "COMPLETED",
        20,
        20,
        "local",
    )
    job = row["job_id"]
    assert job.startswith("local-")
    rdir = Path(row["run_dir"])
    assert json.loads((rdir / "local" / f"{job}.json").read_bytes())["exit_code"] == 0
    assert json.loads((rdir / "checkpoints" / "run.json").read_bytes())["attempts"] == [job]
    ended = json.loads((rdir / "checkpoints" / STATUS_FILE).read_bytes())  # LR and EMA at its step
    assert (row["lr"], row["ema_momentum"]) == (ended["lr"], ended["ema_momentum"]) != (None, None)
    assert row["tensorboard_dir"] == str(rdir / TENSORBOARD_DIR)
    acc = EventAccumulator(row["tensorboard_dir"])
    acc.Reload()  # what `tensorboard --logdir` shows: every logged step once
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    again = cli("resume", row["run_id"], "--json", home=home)  # an attempt would only load step 20
    assert (again.returncode, json.loads(again.stdout)) == (0, {"run_id": row["run_id"], "job_id": None})
    assert cli("resume", job, home=home).stdout == f"run {row['run_id']} completed: nothing to resume\n"
    assert json.loads((rdir / "checkpoints" / "run.json").read_bytes())["attempts"] == [job]
    for step_dir in (rdir / "checkpoints").glob("step-*"):  # ~11 MB each; pytest keeps old tmp dirs
        shutil.rmtree(step_dir)


@pytest.mark.parametrize("damage", [b"", b"not a database, what a crash may leave" * 200])
def test_a_damaged_index_is_rebuilt_from_the_run_folders(home: Path, damage: bytes) -> None:
    """The run folders are the truth: an index left empty or unreadable lists every run again (the
    unreadable file kept beside it), and the next local job id follows the ones the runs hold."""
    from cluster.index import INDEX_FILE, Index

    records = fake_runs(home, 4)
    (home / INDEX_FILE).write_bytes(damage)
    assert sorted(r.run_id for r in Index(home).all()) == sorted(r.run_id for r in records)
    assert Index(home).find(records[1].latest_job).run_id == records[1].run_id
    locals_held = [int(r.latest_job.removeprefix("local-")) for r in records if r.executor == "local"]
    assert Index(home).next_local_job_id() == f"local-{max(locals_held) + 1}"
    assert len(list(home.glob(f"{INDEX_FILE}.unreadable-*"))) == (1 if damage else 0)


def test_ctrl_c_while_queueing_is_answered_once_the_attempt_is_recorded(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C between queueing the first attempt and recording it left a job no run knew (and a cancel
    then said it cancelled a run that went on training): the run's lock is held and the interrupt held
    back until the attempt is recorded, then answered with what was left queued (exit 130)."""
    import fcntl
    import signal

    from cluster import runs
    from cluster.index import Index

    def queue(record: RunRecord, spec: Any, index: Any) -> str:
        with open(record.paths.start_lock, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a cancel waits for the record
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, right after the job was queued
        runs.add_attempt(record, "local-4242", 0.0)  # nothing started: the job stands for one
        return "local-4242"

    monkeypatch.setenv("PIXPRO_HOME", str(home))
    monkeypatch.setattr(runs, "submit_attempt", queue)
    spec = write_spec(tmp_path / "s.json", tiny_spec(tmp_path / "data"))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's pixpro has it
    try:
        code, _, err = run_cli("submit", "--executor", "local", "--no-preflight", str(spec))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
    (run,) = Index(home).all()
    assert code == 130 and err.count("\n") == 1, (code, err)
    assert f"run {run.run_id} was queued as job local-4242" in err and f"pixpro cancel {run.run_id}" in err
    assert Index(home).find("local-4242").run_id == run.run_id and run.attempts == ["local-4242"]


def test_a_slurm_resume_needs_slurms_commands_and_an_answer_about_its_latest_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without sbatch on PATH a SLURM run's resume is a one-line usage error (submitit's "Could not
    detect srun" was an internal error); while SLURM does not answer, the latest attempt is UNKNOWN, not
    ended: it may still run, so nothing is queued beside it (the run or its sweep)."""
    from cluster.sweep import SweepRecord, save_sweep

    home = tmp_path / "home"
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    run = fake_runs(home, 6)[5]  # a preempted SLURM run: resumable
    assert run.executor == "slurm"
    write_spec(run.spec_path, tiny_spec(tmp_path / "data"))  # all a resume needs to queue an attempt
    sweep = SweepRecord(
        "sweep-s-1", "s", 0.0, "slurm", None, ["seed"], [{"run_id": run.run_id, "values": {}}]
    )
    save_sweep(sweep)
    monkeypatch.setenv("PATH", "/nonexistent")
    for ident, what in ((run.run_id, f"run {run.run_id}"), (sweep.sweep_id, f"sweep {sweep.sweep_id}")):
        code, _, err = run_cli("resume", ident)
        assert (code, err) == (
            2,
            f"pixpro: sbatch, srun, squeue, sacct are not on PATH: {what} runs on SLURM (resume it where "
            "SLURM's commands are)\n",
        )

    fake = tmp_path / "bin"  # sbatch would queue; squeue and sacct cannot reach the controller
    fake.mkdir()
    called = tmp_path / "sbatch-called"
    scripts = {
        "sbatch": f"echo called >> {called}; echo 4242",
        "srun": "exit 0",
        "squeue": "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1",
        "sacct": "echo 'sacct: error: Problem talking to the database' >&2; exit 1",
    }
    for name, body in scripts.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    for ident in (run.run_id, sweep.sweep_id):
        code, _, err = run_cli("resume", ident)
        assert (code, err) == (
            1,
            f"pixpro: run {run.run_id}: attempt 9900005 is UNKNOWN (squeue and sacct did not answer): it may "
            "still be queued or running; resume when SLURM answers\n",
        )
    assert not called.exists()
    assert RunRecord.from_json((home / "runs" / run.run_id / "run.json").read_text()).attempts == ["9900005"]


def test_a_job_slurm_answered_for_but_forgot_can_still_be_cancelled() -> None:
    """UNKNOWN because squeue and sacct did not answer may be running (cancel and resume refuse it);
    UNKNOWN because SLURM answered without the job (purged from accounting) is not."""
    silent = slurm_state(SlurmJob("5", unanswered=("squeue", "sacct")), None, cancelled=False, recent=False)
    forgot = slurm_state(SlurmJob("5"), None, cancelled=False, recent=False)
    assert (silent.state, silent.unanswered) == ("UNKNOWN", True)
    assert (forgot.state, forgot.unanswered) == ("UNKNOWN", False)


def test_an_ignored_ctrl_c_stays_ignored_while_queueing() -> None:
    """Under nohup or in a background job SIGINT is ignored: submit does not start answering it."""
    import signal

    from cluster.runs import interrupts_deferred

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred() as interrupted:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        assert not interrupted() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
