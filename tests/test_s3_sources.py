"""Datasets in S3 (moto): what a folder's listing leaves in the rank, and what each read costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch.store.s3 import s3_options
from pixpro.sources import FolderSource
from tests.conftest_s3 import MotoS3, s3_storage_options


def test_a_folder_in_s3_keeps_no_listing_and_reads_each_image_with_one_get(
    tmp_path: Path, moto_s3: MotoS3, raw_s3: Any, s3fs_fresh: None, monkeypatch: Any
) -> None:
    """s3fs's listings cache would hold ~1.2 KB per image in every rank (and be dirtied again by each
    forked worker); a read without a range would cost a HEAD before its GET."""
    import s3fs

    bucket = "pixpro-fixdata-listing"
    if not raw_s3.exists(bucket):
        raw_s3.mkdir(bucket)
    folder = tmp_path / "src"
    for i in range(3):
        (folder / f"c{i}").mkdir(parents=True)
        (folder / f"c{i}" / f"{i}.jpg").write_bytes(bytes([i]) * (100 + i))
    raw_s3.put(str(folder), f"{bucket}/{tmp_path.name}", recursive=True)
    options = s3_options(s3_storage_options(moto_s3.endpoint), None)
    source = FolderSource(f"s3://{bucket}/{tmp_path.name}", options)
    assert len(source) == 3 and source._fs is not None and len(source._fs().dircache) == 0
    calls: list[str] = []
    call_s3 = s3fs.S3FileSystem._call_s3

    async def recording(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recording)
    assert [source.read(i) for i in range(3)] == [bytes([i]) * (100 + i) for i in range(3)]
    assert calls == ["get_object"] * 3
    assert [source.length(i) for i in range(3)] == [100, 101, 102]  # the cache checks hits against them
