"""Checkpoint store throughput on S3, against raw s3fs on the same server.

A 100 MiB checkpoint written, committed and read back through ``CheckpointStore`` against a moto server
on loopback, with raw s3fs put/cat of the same bytes beside it (the store's overhead: multipart parts,
sha256, the HEAD size check, ranged concurrent reads).

    python benches/bench_s3.py [--reps 3] [--mib 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.store import CheckpointStore  # noqa: E402
from tests.conftest_s3 import moto_server, s3_storage_options  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mib", type=int, default=100)
    args = ap.parse_args()
    import s3fs

    data = os.urandom(args.mib * 2**20)
    times: dict[str, list[float]] = {"write": [], "commit": [], "read": [], "raw_put": [], "raw_cat": []}
    with moto_server() as moto:
        url = f"s3://{moto.bucket}/bench-s3-{os.getpid()}"
        store = CheckpointStore(url, s3_storage_options(moto.endpoint), keep_last=1)
        raw = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.endpoint}, skip_instance_cache=True)
        raw_key = f"{url.removeprefix('s3://')}/raw.bin"
        for step in range(args.reps):
            t0 = time.perf_counter()
            entry = store.write(step, "rank0.pt", data)
            t1 = time.perf_counter()
            m = store.commit(step, [entry], {})
            t2 = time.perf_counter()
            assert store.read(m, "rank0.pt") == data
            t3 = time.perf_counter()
            raw.pipe_file(raw_key, data)
            t4 = time.perf_counter()
            raw.cat_file(raw_key)
            t5 = time.perf_counter()
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n| {args.mib} MiB to moto, median of {args.reps} | MiB/s (commit: ms) |")
    print("|---|---|")
    print(f"| store write (multipart, sha256, HEAD size check) | {args.mib / med['write']:.0f} |")
    print(f"| store commit (manifest, latest) | {med['commit'] * 1000:.0f} ms |")
    print(f"| store read + verify (ranged concurrent GETs) | {args.mib / med['read']:.0f} |")
    print(f"| raw s3fs put | {args.mib / med['raw_put']:.0f} |")
    print(f"| raw s3fs cat | {args.mib / med['raw_cat']:.0f} |")


if __name__ == "__main__":
    main()
