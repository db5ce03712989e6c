"""Pack a folder of images into tar shards with a flat index, for shared filesystems and object stores.

    python -m launch.tools.pack SRC DEST [--shard-size 512MB] [--workers N]

SRC is a folder or URL of JPEG/PNG files (ImageNet layout with class folders, or flat); DEST a folder or
URL. DEST receives ``shard-<6d>.tar`` files in webdataset's layout (``<key>.jpg`` + ``<key>.cls`` per
sample, readable by ``tar`` and webdataset), one ``shard-<6d>.json`` beside each (its part of the index,
written after the shard: a shard without it is redone), then ``index.npz`` (flat arrays: shard, offset,
length, label, original relative path) and ``manifest.json`` last (counts, classes, shard sizes and
sha256, the index's sha256, every undecodable source file with its reason).

A killed pack continues where it stopped; a finished one is verified, not rewritten; a DEST that holds a
different pack is refused. Every source file keeps its index (an undecodable one with length 0), so a
packed dataset yields exactly the training samples of the folder it came from. Exit 0 ok, 2 bad input.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from launch.preempt import die_with_parent
from launch.store.backends import failure_cause
from launch.tools.args import Parser, say
from pixpro.sources import (
    PACK_FORMAT,
    PACK_INDEX,
    PACK_MANIFEST,
    FolderSource,
    ReadFailed,
    SourceError,
    _filesystem,
    _retrying,
    class_labels,
    split_url,
)
from schemas.contract import Exit, one_line

EXIT_BAD_INPUT = Exit.USAGE
_STORE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")
T = TypeVar("T")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip


PACK_STARTED = "pack-started.json"
"""Written first into an empty DEST, removed after the manifest: a DEST a pack began in."""
MAX_WORKERS_PER_CORE = 4
MIN_SHARD_SIZE = 4000


class PackError(Exception):
    """A one-line problem with SRC or DEST (exit 2)."""


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m or m.group(2).lower() not in _UNITS:
        raise PackError(f"--shard-size {text[:40]!r}: expected a size like 512MB, 1GB or 256MiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < MIN_SHARD_SIZE:
        raise PackError(f"--shard-size {text[:40]!r}: give at least {MIN_SHARD_SIZE // 1000}KB")
    return size


# -- the destination ---------------------------------------------------------------------------------
def storage_options(url: str) -> dict[str, Any]:
    """The trainer's fsspec options for ``url`` (``data_storage_options`` of a spec without any): on S3
    the endpoint from ``PIXPRO_S3_ENDPOINT``, credentials from the environment, the store's timeouts."""
    if url.lower().startswith(("s3://", "s3a://")):
        from launch.store.s3 import s3_options

        return s3_options({}, None)
    return {}


class Dest:
    """A folder or URL that receives whole objects only (a local file appears by rename); remote calls
    are retried within a deadline as the trainer's reads are."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        protocol, path = split_url(self.root)
        self.fs: Any = None
        self.base = path
        if protocol:
            self.fs, self.base = _filesystem(self.root, storage_options(self.root))
        else:
            Path(path).mkdir(parents=True, exist_ok=True)

    def _remote(self, call: Callable[[str], T], rel: str) -> T:
        path = f"{self.base}/{rel}" if rel else self.base
        return _retrying(lambda: call(path), f"{self.root}/{rel}")

    def put(self, rel: str, data: bytes) -> None:
        if self.fs is not None:
            self._remote(lambda path: self.fs.pipe_file(path, data), rel)
            return
        final = Path(self.base, rel)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def get(self, rel: str) -> bytes | None:
        try:
            if self.fs is not None:
                return self._remote(lambda path: bytes(self.fs.cat_file(path, start=0)), rel)
            return Path(self.base, rel).read_bytes()
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        """What DEST holds at its top level (names only)."""
        if self.fs is not None:
            if not self._remote(self.fs.exists, ""):
                return []
            listed = self._remote(lambda path: self.fs.ls(path, detail=False, refresh=True), "")
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed)
        return sorted(os.listdir(self.base))

    def remove(self, rel: str) -> None:
        if self.fs is not None:
            self._remote(self.fs.rm_file, rel)
        else:
            Path(self.base, rel).unlink(missing_ok=True)

    def size(self, rel: str) -> int | None:
        try:
            if self.fs is not None:
                return int(self._remote(lambda path: self.fs.info(path, refresh=True)["size"], rel))
            return Path(self.base, rel).stat().st_size
        except FileNotFoundError:
            return None


# -- the plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardPlan:
    number: int
    start: int  # first global index
    stop: int  # one past the last
    names_sha: str  # of the relative paths it packs: a sidecar of another plan is never reused

    @property
    def tar(self) -> str:
        return f"shard-{self.number:06d}.tar"

    @property
    def sidecar(self) -> str:
        return f"shard-{self.number:06d}.json"


def plan_shards(names: list[str], sizes: list[int], target: int) -> list[ShardPlan]:
    """Contiguous index ranges of about ``target`` bytes each (a function of SRC's listing only)."""
    plans: list[ShardPlan] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        total += size + 1024  # tar headers
        if total >= target or i == len(sizes) - 1:
            digest = hashlib.sha256("\n".join(names[start : i + 1]).encode()).hexdigest()
            plans.append(ShardPlan(len(plans), start, i + 1, digest))
            start, total = i + 1, 0
    return plans


def _source_sizes(source: FolderSource) -> list[int]:
    if source._fs is None:
        return [os.path.getsize(source.path(i)) for i in range(len(source))]
    return [source.length(i) or 0 for i in range(len(source))]  # from its listing: no second one


# -- packing one shard (in a worker process) ---------------------------------------------------------
_SOURCE: FolderSource | None = None


def _init_worker(source: FolderSource, parent: int) -> None:
    global _SOURCE
    _SOURCE = source
    die_with_parent(parent)  # a killed pack leaves no worker behind


def pack_shard(plan: ShardPlan, dest_root: str) -> dict[str, Any]:
    """Read, decode (with the trainer's decoder) and tar one range; write the shard, then its sidecar."""
    from pixpro.data import decode_rgb

    assert _SOURCE is not None
    source, dest = _SOURCE, Dest(dest_root)
    buf = io.BytesIO()
    entries: list[dict[str, Any]] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(plan.start, plan.stop):
            name = source.name(i)
            entry: dict[str, Any] = {"index": i, "offset": 0, "length": 0, "label": source.label(i)}
            try:
                data = source.read(i)
                decode_rgb(data)
            except (RuntimeError, OSError, ReadFailed) as exc:
                entry["reason"] = one_line(str(exc))
                entries.append(entry)
                continue
            key = f"{i:09d}"
            info = tarfile.TarInfo(f"{key}{Path(name).suffix.lower()}")
            info.size, info.mtime = len(data), 0
            data_offset = tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT))  # header, then the bytes
            tar.addfile(info, io.BytesIO(data))
            entry["offset"], entry["length"] = data_offset, len(data)
            cls = str(source.label(i)).encode()
            label = tarfile.TarInfo(f"{key}.cls")
            label.size, label.mtime = len(cls), 0
            tar.addfile(label, io.BytesIO(cls))
            entries.append(entry)
    body = buf.getvalue()
    dest.put(plan.tar, body)
    sidecar = {
        "names_sha256": plan.names_sha,
        "start": plan.start,
        "stop": plan.stop,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "entries": entries,
    }
    dest.put(plan.sidecar, json.dumps(sidecar).encode())
    return sidecar


def _finished(dest: Dest, plan: ShardPlan) -> dict[str, Any] | None:
    """The sidecar of a shard a previous run finished (same sources, the shard whole), else None."""
    raw = dest.get(plan.sidecar)
    if raw is None:
        return None
    try:
        side = json.loads(raw)
    except ValueError:
        return None
    if side.get("names_sha256") != plan.names_sha or dest.size(plan.tar) != side.get("size"):
        return None
    return side


# -- the whole pack ----------------------------------------------------------------------------------
def _within(dest: str, src: str) -> bool:
    """DEST is SRC or a folder below it: the shards, index and manifest would land among the images."""

    def norm(where: str) -> str:
        return where.rstrip("/") if "://" in where else os.path.realpath(where)

    inner, outer = norm(dest), norm(src)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def pack(src: str, dest_root: str, shard_size: int, workers: int, progress: bool = True) -> dict[str, Any]:
    if _within(dest_root, src):
        raise PackError(f"{dest_root} is within the dataset folder {src}: give the shards one outside it")
    try:
        source = FolderSource(src, storage_options(src))
    except SourceError as exc:
        raise PackError(str(exc)) from None
    dest = Dest(dest_root)
    names = [source.name(i) for i in range(len(source))]
    listing_sha = hashlib.sha256("\n".join(names).encode()).hexdigest()
    existing = dest.get(PACK_MANIFEST)
    if existing is not None:
        return verify(dest, _pack_manifest(dest, existing), listing_sha)
    _claim(dest)
    plans = plan_shards(names, _source_sizes(source), shard_size)
    t0 = time.monotonic()
    sidecars: dict[int, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        done = _finished(dest, plan)
        if done is not None:
            sidecars[plan.number] = done
        else:
            todo.append(plan)
    reused = len(sidecars)
    bar = _Bar(len(plans), reused, enabled=progress)
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(  # never more processes than shards left to pack
        max(1, min(workers, len(todo))),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(source, os.getpid()),
    ) as pool:
        futures = {pool.submit(pack_shard, plan, dest_root): plan for plan in todo}
        for fut in as_completed(futures):
            sidecars[futures[fut].number] = fut.result()
            bar.advance()
    bar.close()
    seconds = time.monotonic() - t0

    entries = [e for n in sorted(sidecars) for e in sidecars[n]["entries"]]
    shard_of = np.repeat(np.arange(len(plans), dtype=np.uint32), [p.stop - p.start for p in plans])
    classes, labels = class_labels(names)
    name_bytes = [n.encode() for n in names]
    name_offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in name_bytes], out=name_offsets[1:])
    index_buf = io.BytesIO()
    np.savez(
        index_buf,
        shard=shard_of,
        offset=np.array([e["offset"] for e in entries], dtype=np.int64),
        length=np.array([e["length"] for e in entries], dtype=np.int64),
        label=labels,
        name_blob=np.frombuffer(b"".join(name_bytes), dtype=np.uint8),
        name_offsets=name_offsets,
    )
    index_body = index_buf.getvalue()
    skipped = [{"path": names[e["index"]], "reason": e["reason"]} for e in entries if "reason" in e]
    manifest = {
        "format": PACK_FORMAT,
        "samples": len(names),
        "usable": len(names) - len(skipped),
        "classes": classes,
        "source_listing_sha256": listing_sha,
        "shard_size": shard_size,
        "shards": [
            {"name": p.tar, "size": sidecars[p.number]["size"], "sha256": sidecars[p.number]["sha256"]}
            for p in plans
        ],
        "index": {
            "name": PACK_INDEX,
            "size": len(index_body),
            "sha256": hashlib.sha256(index_body).hexdigest(),
        },
        "undecodable": skipped,
        "created": time.time(),
    }
    dest.put(PACK_INDEX, index_body)
    dest.put(PACK_MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    dest.remove(PACK_STARTED)
    return {
        "action": "packed",
        "samples": len(names),
        "undecodable": skipped,
        "shards": len(plans),
        "shards_reused": reused,
        "seconds": round(seconds, 2),
        "images_per_s": round((sum(p.stop - p.start for p in todo)) / max(seconds, 1e-9), 1),
    }


def _pack_manifest(dest: Dest, body: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(body)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise PackError(
            f"{dest.root} holds a {PACK_MANIFEST} that is not a pixpro pack's: choose another DEST; "
            "nothing was written"
        )
    return manifest


def _claim(dest: Dest) -> None:
    """Pack only into an empty DEST, or one that a pack began (and was killed in): files it did not
    write (a webdataset's ``shard-000000.tar``, say) would be overwritten by name."""
    here = dest.names()
    if not here:
        dest.put(PACK_STARTED, json.dumps({"format": PACK_FORMAT}).encode())
    elif PACK_STARTED not in here:
        raise PackError(
            f"{dest.root} holds {len(here)} file(s) that pixpro pack did not write "
            f"({here[0]}{', ...' if len(here) > 1 else ''}): "
            "give an empty or new folder; nothing was written"
        )


def verify(dest: Dest, manifest: dict[str, Any], listing_sha: str) -> dict[str, Any]:
    """A finished pack: the same sources, every shard whole, the index the manifest names."""
    if manifest.get("format") != PACK_FORMAT or manifest.get("source_listing_sha256") != listing_sha:
        raise PackError(
            f"{dest.root} already holds a different pack ({manifest.get('samples')} samples from another "
            "source listing): choose another DEST; nothing was written"
        )
    for shard in manifest["shards"]:
        size = dest.size(shard["name"])
        if size != shard["size"]:
            raise PackError(f"{dest.root}/{shard['name']} is {size} bytes, the manifest says {shard['size']}")
    index = dest.get(PACK_INDEX) or b""
    if hashlib.sha256(index).hexdigest() != manifest["index"]["sha256"]:
        raise PackError(f"{dest.root}/{PACK_INDEX} does not match its manifest")
    return {
        "action": "verified",
        "samples": manifest["samples"],
        "undecodable": manifest["undecodable"],
        "shards": len(manifest["shards"]),
    }


class _Bar:
    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task("packing shards", total=total, completed=done)
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="pixpro pack", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="folder or URL of images")
    parser.add_argument("dest", help="folder or URL for the shards")
    parser.add_argument("--shard-size", default="512MB", help="target shard size (default 512MB)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        most = MAX_WORKERS_PER_CORE * (os.cpu_count() or 1)
        if not 1 <= args.workers <= most:
            raise PackError(
                f"--workers {args.workers}: give 1 to {most} ({MAX_WORKERS_PER_CORE} per core here)"
            )
        summary = pack(args.src, args.dest, parse_size(args.shard_size), args.workers)
    except PackError as exc:
        say(f"pixpro: {exc}")
        return EXIT_BAD_INPUT
    except ReadFailed as exc:  # the store did not answer, after retries
        say(f"pixpro: {exc}")
        return Exit.FAILURE
    except OSError as exc:
        say(f"pixpro: {exc.filename or args.dest}: {exc.strerror or exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:
        if not type(exc).__module__.startswith(_STORE_MODULES):
            raise
        say(f"pixpro: {args.src} -> {args.dest}: {failure_cause(exc)}")
        return Exit.FAILURE
    bad = summary["undecodable"]
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['action']} {summary['samples']} images in {summary['shards']} shards at {args.dest}"
            + (f" ({summary['images_per_s']} img/s)" if "images_per_s" in summary else "")
        )
    for item in bad[:20]:
        print(
            f"pixpro: undecodable, kept as a skipped index: {item['path']}: {item['reason']}", file=sys.stderr
        )
    if bad:
        more = f" (first 20 above; all in {PACK_MANIFEST})" if len(bad) > 20 else ""
        print(f"pixpro: {len(bad)} undecodable image(s){more}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
