"""The trainer on packed data and on data in S3: the same run as on the folder, bitwise, through a
resume and through cut connections; replaced samples are counted in metrics and status."""

from __future__ import annotations

import json

import pytest

from launch.preempt import EXIT_PREEMPTED
from launch.records import read_metrics
from launch.store import CheckpointStore
from launch.store.s3 import s3_options
from launch.tools.pack import main as pack_main
from pixpro.sources import READ_TRIES, FolderSource, PackedSource, ReadFailed, open_source
from tests.conftest_s3 import MotoS3, s3_storage_options
from tests.faultproxy import FaultProxy
from tests.support.trainer import assert_identical, final_state, run_trainer, tiny_spec, write_spec

pytestmark = [pytest.mark.slow]


def _model_of(state: dict) -> dict:
    """What training produced (train.pt's state, every rank's RNG), not the spec hash that names the root."""
    return {"state": state["train.pt"]["state"], **{k: v for k, v in state.items() if k.startswith("rank")}}


def _folder_run_and_pack(tmp_path, tiny_run):
    """The session's tiny run (trained on an image folder) and its images packed into tmp_path/packed."""
    images = tiny_run / "data" / "images"
    assert pack_main([str(images), str(tmp_path / "packed"), "--shard-size", "20KB"]) == 0
    return final_state(str(tiny_run / "run" / "checkpoints"))


def test_packed_data_trains_bitwise_like_the_folder_through_a_resume(tmp_path, tiny_run):
    golden = _folder_run_and_pack(tmp_path, tiny_run)
    packed = tiny_spec(tmp_path / "packed")
    del packed["data"]["demo"]
    spec = write_spec(tmp_path / "packed.json", packed)
    run = tmp_path / "run"
    assert run_trainer(spec, run, PIXPRO_STOP_AT_STEP="4").returncode == EXIT_PREEMPTED
    res = run_trainer(spec, run)
    assert res.returncode == 0 and "resumed from step 4" in res.stderr, res.stderr[-3000:]
    assert_identical(_model_of(golden), _model_of(final_state(str(run / "checkpoints"))))
    records = read_metrics(CheckpointStore(str(run / "checkpoints")))
    assert records[-1]["data_skips"] == 0


def test_packed_data_in_s3_through_cut_connections_trains_bitwise_alike(
    tmp_path, tiny_run, moto_s3: MotoS3, fault_proxy: FaultProxy, raw_s3
):
    golden = _folder_run_and_pack(tmp_path, tiny_run)
    url = f"s3://{moto_s3.bucket}/data-{tmp_path.name}"
    raw_s3.put(str(tmp_path / "packed"), url.removeprefix("s3://"), recursive=True)
    spec_dict = tiny_spec(
        tmp_path / "unused",
        data__root=url,
        data__num_workers=2,
        data__storage_options=s3_storage_options(fault_proxy.url),
    )
    del spec_dict["data"]["demo"]
    spec = write_spec(tmp_path / "s3.json", spec_dict)
    with fault_proxy.cuts_now_and_then(every_s=0.2, nbytes=200):
        res = run_trainer(spec, tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert fault_proxy.stats.resets >= 3, fault_proxy.stats
    assert_identical(_model_of(golden), _model_of(final_state(str(tmp_path / "run" / "checkpoints"))))
    status = json.loads((tmp_path / "run" / "checkpoints" / "status.json").read_text())
    assert status["state"] == "completed" and status["data_skips"] == 0  # retried, never replaced


def test_a_truncated_shard_is_skipped_counted_and_training_completes(tmp_path, tiny_run):
    """Samples that cannot be read are replaced by the next usable one, counted in metrics and status."""
    _folder_run_and_pack(tmp_path, tiny_run)
    shard = tmp_path / "packed" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:2048])  # cut on the store: its samples read short
    packed = tiny_spec(tmp_path / "packed")
    del packed["data"]["demo"]
    res = run_trainer(write_spec(tmp_path / "cut.json", packed), tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "read failed" in res.stderr
    status = json.loads((tmp_path / "run" / "checkpoints" / "status.json").read_text())
    records = read_metrics(CheckpointStore(str(tmp_path / "run" / "checkpoints")))
    assert status["state"] == "completed" and status["data_skips"] > 0
    assert records[-1]["data_skips"] == status["data_skips"]


def _packed_in_s3(tmp_path, moto_s3: MotoS3, raw_s3) -> tuple[str, str]:
    """Three small PNGs as a folder and as a pack in the bucket: (folder URL, pack URL)."""
    from PIL import Image

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(src / f"{i}.png")
    assert pack_main([str(src.parent), str(tmp_path / "packed")]) == 0
    folder, packed = (f"s3://{moto_s3.bucket}/{kind}-{tmp_path.name}" for kind in ("folder", "packed"))
    raw_s3.put(str(src.parent), folder.removeprefix("s3://"), recursive=True)
    raw_s3.put(str(tmp_path / "packed"), packed.removeprefix("s3://"), recursive=True)
    return folder, packed


def _data_options(fault_proxy: FaultProxy) -> dict:
    """The trainer's options for data in S3 through the proxy: botocore's retries off, so each reset
    reaches pixpro's own retry loop."""
    return s3_options(s3_storage_options(fault_proxy.url), None) | {"skip_instance_cache": True}


def test_a_stalled_store_fails_a_read_within_its_deadline(
    tmp_path, moto_s3: MotoS3, fault_proxy: FaultProxy, raw_s3
):
    _, url = _packed_in_s3(tmp_path, moto_s3, raw_s3)
    source = PackedSource(url, _data_options(fault_proxy))
    assert source.read(0)  # reachable
    fault_proxy.stall()
    with pytest.raises(ReadFailed):  # 4 tries of one 3 s read timeout each, then reported, never a hang
        source.read(1)
    fault_proxy.passthrough()


def test_opening_a_dataset_in_s3_retries_each_call(
    tmp_path, moto_s3: MotoS3, fault_proxy: FaultProxy, raw_s3
):
    """The probe for a pack manifest and a folder's listing are retried like every read: a trainer does not
    fail to start on one reset connection. aiohttp sends a GET or HEAD twice before it gives up on a reset,
    so 2 * (READ_TRIES - 1) resets fail all tries but the last."""
    folder, packed = _packed_in_s3(tmp_path, moto_s3, raw_s3)
    options = _data_options(fault_proxy)
    for open_it, url, kind in ((open_source, packed, PackedSource), (FolderSource, folder, FolderSource)):
        resets = fault_proxy.stats.resets
        fault_proxy.reset_after(0, times=2 * (READ_TRIES - 1))
        source = open_it(url, options)
        assert isinstance(source, kind) and len(source) == 3
        assert fault_proxy.stats.resets - resets == 2 * (READ_TRIES - 1)
    fault_proxy.reset_after(0, times=2 * READ_TRIES)
    with pytest.raises(ReadFailed, match=r"manifest\.json: EndpointConnectionError"):
        open_source(packed, options)
    fault_proxy.passthrough()
