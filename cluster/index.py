"""The local run index (sqlite in ``$PIXPRO_HOME``): list runs and map job ids to runs in one query.

The run folders stay the source of truth; the index is rebuilt from their ``run.json`` files when it
is missing, so deleting it loses nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.errors import NotFound
from cluster.home import pixpro_home, runs_dir
from cluster.record import RECORD_FILE, RunRecord

INDEX_FILE = "index.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, created REAL NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, run_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS local_ids (n INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL);
"""


class Index:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or pixpro_home()
        self.path = self.home / INDEX_FILE

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.home.mkdir(parents=True, exist_ok=True)
        # missing, or empty (what a crash or a full disk can leave): rebuilt from the run folders
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        con = sqlite3.connect(self.path, timeout=30)
        try:
            try:
                with con:
                    con.executescript(_SCHEMA)
            except sqlite3.DatabaseError:  # not a database: kept beside, for whoever wants to look
                con.close()
                self.path.replace(self.path.with_name(f"{INDEX_FILE}.unreadable-{time.time():.0f}"))
                con, fresh = sqlite3.connect(self.path, timeout=30), True
                with con:
                    con.executescript(_SCHEMA)
            if fresh:
                with con:
                    self._rebuild(con)
            with con:
                yield con
        finally:
            con.close()

    def _rebuild(self, con: sqlite3.Connection) -> None:
        last_local = 0
        for path in sorted(runs_dir(self.home).glob(f"*/{RECORD_FILE}")):
            try:
                record = RunRecord.from_json(path.read_bytes())
            except (OSError, ValueError, TypeError):
                continue
            self._put(con, record)
            numbers = [job.removeprefix("local-") for job in record.attempts if job.startswith("local-")]
            last_local = max([last_local, *(int(n) for n in numbers if n.isdecimal())])
        if last_local:  # the next local job id follows the ones the run folders hold, never reuses one
            con.execute(
                "INSERT OR IGNORE INTO local_ids (n, created) VALUES (?, ?)", (last_local, time.time())
            )

    @staticmethod
    def _put(con: sqlite3.Connection, record: RunRecord) -> None:
        con.execute(
            "INSERT OR REPLACE INTO runs (run_id, created, record) VALUES (?, ?, ?)",
            (record.run_id, record.created, record.to_json()),
        )
        con.executemany(
            "INSERT OR REPLACE INTO jobs (job_id, run_id) VALUES (?, ?)",
            [(job, record.run_id) for job in record.attempts],
        )

    def put(self, record: RunRecord) -> None:
        with self._db() as con:
            self._put(con, record)

    def remove(self, run_id: str) -> None:
        with self._db() as con:
            con.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            con.execute("DELETE FROM jobs WHERE run_id = ?", (run_id,))

    def all(self) -> list[RunRecord]:
        if not self.path.exists() and not runs_dir(self.home).is_dir():
            return []  # nothing ever submitted: do not create files just to list nothing
        with self._db() as con:
            rows = con.execute("SELECT record FROM runs ORDER BY created, run_id").fetchall()
        return [RunRecord.from_dict(json.loads(r[0])) for r in rows]

    def find(self, ident: str) -> RunRecord:
        """A run by run id, by the job id of any of its attempts, or by a unique run-id prefix."""
        ident = ident.strip()
        if not ident:
            raise NotFound("empty run or job id")
        if not self.path.exists() and not runs_dir(self.home).is_dir():
            raise NotFound(f"no run or job {ident!r} (no runs yet)")
        with self._db() as con:
            row = con.execute("SELECT record FROM runs WHERE run_id = ?", (ident,)).fetchone()
            if row is None:
                row = con.execute(
                    "SELECT r.record FROM jobs j JOIN runs r ON r.run_id = j.run_id WHERE j.job_id = ?",
                    (ident,),
                ).fetchone()
            if row is None:
                like = ident.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                rows = con.execute(
                    "SELECT record FROM runs WHERE run_id LIKE ? ESCAPE '\\' LIMIT 2", (like,)
                ).fetchall()
                if len(rows) == 2:
                    raise NotFound(f"{ident!r} matches several runs; give the full run id")
                row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"no run or job {ident!r} (see: pixpro status)")
        return RunRecord.from_dict(json.loads(row[0]))

    def next_local_job_id(self) -> str:
        """``local-<n>``: unique on this machine, so ``pixpro resume local-7`` names one attempt."""
        with self._db() as con:
            cur = con.execute("INSERT INTO local_ids (created) VALUES (?)", (time.time(),))
            return f"local-{cur.lastrowid}"
