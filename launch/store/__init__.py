"""Checkpoint storage on any fsspec URL that a crash, a preemption or a stale attempt cannot corrupt.

Object stores have no rename, and an exception inside ``with fs.open(path, "wb")`` on s3fs *completes*
the upload, so "write to a temp name then rename" does not exist there. This module instead follows the
protocol that DCP and Composer converged on:

Layout under the store URL::

    step-000000001234.<attempt>/rank0.pt      data files, whole objects (streamed: multipart), size verified
    step-000000001234.<attempt>/manifest.json the commit marker: written LAST, create-only
    latest                                    {"step", "prefix", "manifest_sha256", "generation", ...}, CAS
    claims/<attempt>.json                     the generation each attempt claimed
    status.json, run.json, metrics/, aux/     auxiliary objects (put_aux): never foreign, never pruned

* Every checkpoint gets a never-reused prefix: the attempt id is always part of it, so a stale attempt
  still uploading step 1234 can never mix its bytes into the new attempt's step 1234. ``attempt`` must
  therefore be unique per launch (e.g. ``f"{SLURM_JOB_ID}-{SLURM_RESTART_COUNT}"``); ``write`` refuses a
  prefix that already holds a manifest.
* ``commit`` waits until every rank's file is present with the right size, writes the manifest with
  ``If-None-Match: *`` and then moves ``latest`` by compare-and-swap (``If-Match: <etag>`` on S3, a temp
  file + ``os.replace`` under an fcntl lock on local disk), retrying on 412. ``latest`` only ever moves
  to a higher step, so an older attempt that is still running cannot roll it back. Old
  checkpoints are pruned only after that, never the one ``latest`` names.
* Fencing: each attempt ``claim``s the run at its start, writing the next generation into ``latest``;
  a commit by an attempt whose generation is below the pointer's raises :class:`Superseded` instead of
  moving it (and pruning). A stale attempt (its node lost SLURM but not the store, so it trained on
  after the job was requeued) thus stops at its next checkpoint instead of leading ``latest`` and
  pruning the live attempt's checkpoints; a restart of its workers cannot claim again (its claim is
  on record under ``claims/``).
* ``resolve``/``candidates`` trust ``latest`` only if its manifest validates (every file present, right
  size), else walk the other manifests newest first; every skipped candidate is one warning line.
  ``read`` verifies size and sha256 and raises :class:`CorruptCheckpoint`; ``load_latest`` falls back
  to the next older checkpoint when that happens.

Split by concern: :mod:`.format` (names, manifest, pointer, layout), :mod:`.backends` (local folder,
any fsspec filesystem), :mod:`.s3` (S3: conditional writes, deadlines, retries, the endpoint rule),
:mod:`.secrets` (credentials never written or echoed) and :mod:`.protocol` (commit, resolve, read).
Torch-free: the trainer writes and the CLI reads through the same code.
"""

from launch.store.format import (
    CheckpointExists,
    CommitTimeout,
    CorruptCheckpoint,
    FileEntry,
    Manifest,
    StoreError,
    StoreUnavailable,
    Superseded,
)
from launch.store.protocol import CheckpointStore
from schemas.contract import AUX_TOP, LATEST, MANIFEST

__all__ = [
    "AUX_TOP",
    "LATEST",
    "MANIFEST",
    "CheckpointExists",
    "CheckpointStore",
    "CommitTimeout",
    "CorruptCheckpoint",
    "FileEntry",
    "Manifest",
    "StoreError",
    "StoreUnavailable",
    "Superseded",
]
