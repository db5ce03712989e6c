"""The nodes a run leaves out: those that failed it :data:`~schemas.contract.EXCLUDE_AFTER` times.

The compute side writes one record per failure blamed on a node (:mod:`launch.node_failures`); here
they are counted, less those the user forgave (``pixpro resume --include-node``), for ``sbatch
--exclude`` and for ``pixpro status``. Torch-free.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.errors import UsageError
from cluster.record import RunRecord
from schemas.contract import RunPaths, excluded_nodes, failure_counts

if TYPE_CHECKING:
    from schemas.records import NodeFailure


def failures(run_dir: Path) -> list[NodeFailure]:
    paths = sorted(RunPaths(run_dir).node_failures.glob("*.json"))
    if not paths:
        return []  # a run no node failed needs no model (pixpro status need not import pydantic)
    from schemas.records import NodeFailure

    out = []
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            out.append(NodeFailure.model_validate_json(path.read_bytes()))
    return out


def counts(record: RunRecord) -> dict[str, int]:
    """Failures per node that still count (a forgiven node starts again from zero)."""
    return failure_counts(failures(Path(record.run_dir)), record.forgotten_nodes)


def excluded(record: RunRecord) -> list[str]:
    return excluded_nodes(counts(record))


def include(record: RunRecord, nodes: list[str]) -> None:
    """Forget these nodes' failures so far (the record is saved by the caller)."""
    known = {f.node for f in failures(Path(record.run_dir))}
    unknown = [n for n in nodes if n not in known]
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise UsageError(
            f"--include-node {unknown[0]}: no failure of this run on that node (failed nodes: {listed})"
        )
    now = time.time()
    for node in nodes:
        record.forgotten_nodes[node] = now
