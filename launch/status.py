"""The run's own status record, next to its checkpoints: what ``pixpro status`` reads besides sacct."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from launch.store import CheckpointStore

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def write_status(store: CheckpointStore, **fields: Any) -> None:
    """Overwrite ``status.json`` (one small PUT); failures are logged, never fatal."""
    record = {"updated": round(time.time(), 3), **fields}
    try:
        store.put_aux(STATUS_FILE, json.dumps(record, sort_keys=True).encode())
    except Exception as exc:
        log.warning("could not write %s: %s", STATUS_FILE, type(exc).__name__)
