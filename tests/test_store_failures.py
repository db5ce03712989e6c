"""Store failures read as their cause, in words a person can act on: a connection reset by the store, a
full or read-only disk, an HTTP error code; never the serializer's "unexpected pos" that a broken
stream makes torch.save report."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from launch.checkpoint import Checkpointer
from launch.store import CheckpointStore, StoreUnavailable
from launch.store.backends import FileSink, failure_cause
from tests.conftest_s3 import s3_storage_options
from tests.support import zygote
from tests.support.procs import wait_for

pytestmark = pytest.mark.timeout(300)


def _state(mib: float) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(int(mib * 2**20 / 4), generator=g), "step": 1}


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tiny tmpfs (root only) at ``path``, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


ROOT = os.geteuid() == 0


def test_full_disk_reads_as_disk_full_not_as_a_serializer_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save into a store whose disk fills up: the error is the ENOSPC, named with its file."""
    with contextlib.ExitStack() as stack:
        if ROOT:
            folder = stack.enter_context(_tmpfs(tmp_path / "full", "1m"))
        else:  # no tmpfs without root: the sink's write fails as a full disk's would

            def full(self: FileSink, chunk: memoryview) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp))

            folder = tmp_path / "full"
            monkeypatch.setattr(FileSink, "write", full)
        store = CheckpointStore(str(folder / "ckpt"))
        state = _state(4)
        with pytest.raises(OSError) as got:
            store.write(1, "train.pt", lambda f: torch.save(state, f))
        assert got.value.errno == errno.ENOSPC
        cause = failure_cause(got.value)
        assert cause.startswith("disk full") and str(folder) in cause, cause
        assert not [p for p in (folder / "ckpt").rglob("*") if p.is_file()]  # nothing partial left


def test_read_only_folder_is_named_in_the_uploaders_report(tmp_path: Path) -> None:
    """A save into a read-only folder: the store error the trainer reports (status.json, metrics) says
    so, once per cause, and names the folder."""
    with contextlib.ExitStack() as stack:
        if ROOT:
            folder = stack.enter_context(_tmpfs(tmp_path / "ro", "1m", read_only=True))
        else:
            folder = tmp_path / "ro"
            folder.mkdir()
            folder.chmod(0o555)
            stack.callback(folder.chmod, 0o755)
        ck = Checkpointer(
            CheckpointStore(str(folder / "ckpt"), attempt="t"), 0, 1, retry_for_s=5.0, spare=zygote.uploader()
        )
        try:
            wait_for("the uploader to start", lambda: ck._ready, 120, 0.05)
            assert not ck.save(1, _state(1), {"rng": torch.get_rng_state()}, {}, blocking=True, budget_s=8)
            error = ck.health()["store_error"]
        finally:
            ck.close()
    assert error and ("read-only" in error or "permission denied" in error), error
    assert str(folder) in error, error


def test_reset_mid_upload_reads_as_a_reset(tmp_path, moto_s3, fault_proxy, s3_url) -> None:
    """An S3 endpoint that resets every connection during an upload larger than one part (so the upload
    runs inside torch.save): the report names the reset, then the retry commits once it stops."""
    store = CheckpointStore(s3_url, s3_storage_options(fault_proxy.url), attempt="t")
    ck = Checkpointer(store, 0, 1, spare=zygote.uploader())
    try:
        fault_proxy.reset_after(64 * 1024, once=False)
        assert ck.save(1, _state(12), {"rng": torch.get_rng_state()}, {}, blocking=False)
        wait_for("a reported failure", lambda: ck.health()["store_error"], 120, 0.05)
        error = ck.health()["store_error"]
        fault_proxy.passthrough()
        assert ck.flush(timeout_s=180)
    finally:
        ck.close()
    assert "reset by the store" in error, error
    assert "unexpected pos" not in error and "enforce fail" not in error, error
    assert fault_proxy.stats.resets >= 1


def test_http_error_names_status_and_code(moto_s3) -> None:
    store = CheckpointStore(
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", s3_storage_options(moto_s3.endpoint)
    )
    with pytest.raises(Exception) as got:
        store.put_aux("status.json", b"{}")
    assert not isinstance(got.value, StoreUnavailable)
    cause = failure_cause(got.value)
    assert "HTTP 404 NoSuchBucket" in cause and "bucket name" in cause, cause
