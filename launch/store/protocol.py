"""The commit protocol: a checkpoint is a never-reused prefix whose manifest is written last, and
``latest`` moves forward only, by compare-and-swap (see the package docstring)."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from launch.store.backends import Backend, FsspecBackend, LocalBackend, Sink
from launch.store.format import (
    ATTEMPT_RE,
    AUX_RE,
    MAX_STEP,
    NAME_RE,
    POINTER_FORMAT,
    CheckpointExists,
    CommitTimeout,
    CorruptCheckpoint,
    FileEntry,
    Layout,
    Manifest,
    StoreError,
    Superseded,
    claim_body,
    claimed_generation,
    one_line,
    parse_pointer,
    pointer_body,
    same_commit,
    scan_layout,
    short,
    step_of,
    step_order,
)
from launch.store.secrets import Redactor, collect_secrets, split_url
from schemas.contract import AUX_TOP, CLAIMS_DIR, LATEST, MANIFEST, MAX_LINE

log = logging.getLogger("launch.store")

_CAS_MAX_TRIES = 100
_JITTER = random.Random()  # the CAS back-off's own generator: never the trainer's saved stream


RESOLVE_PASSES = 3
"""How often a reader lists the store while ``latest`` moves under it and nothing listed was valid."""


class _HashingWriter:
    """The file object a serializer writes into: hashes as it goes and hands the sink bounded pieces
    (a memoryview slice of a large write is not a copy)."""

    PIECE = 4 * 2**20

    def __init__(self, sink: Sink) -> None:
        self.sink, self.sha, self.size = sink, hashlib.sha256(), 0
        self.error: BaseException | None = None  # the sink's own failure, which a serializer hides

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), self.PIECE):
            piece = view[i : i + self.PIECE]
            self.sha.update(piece)
            try:
                self.sink.write(piece)
            except BaseException as e:
                self.error = self.error or e
                raise
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass


class CheckpointStore:
    """Checkpoints under one fsspec URL (local folder by default, ``s3://`` with real conditional writes).

    Torch-free: bytes in, bytes out. Each rank ``write``s its own file(s); one rank ``commit``s with all
    ranks' :class:`FileEntry` (e.g. gathered over the process group); any rank can ``resolve``/``read``.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        keep_last: int = 3,
        attempt: str = "0",
        *,
        timeout_s: float = 20.0,
        claimed: tuple[str, int] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        if not ATTEMPT_RE.match(attempt):
            raise ValueError(f"attempt {attempt!r} must match {ATTEMPT_RE.pattern}")
        self.keep_last = keep_last
        self.attempt = attempt
        self.claimed = claimed
        """(owner, generation) of :meth:`claim`: commits are fenced by it; None: not fenced."""
        self._config = {
            "url": url,
            "storage_options": storage_options,
            "keep_last": keep_last,
            "attempt": attempt,
            "timeout_s": timeout_s,
            "claimed": claimed,
        }
        options = dict(storage_options or {})
        protocol, path, userinfo, self.url = split_url(url)
        self._redactor = Redactor(collect_secrets(options, userinfo))
        self.cas_conflicts = 0  # how often moving 'latest' lost a race and retried (for tests/metrics)
        with self._redactor.guard():
            if protocol in ("", "file", "local"):
                self._backend: Backend = LocalBackend(path)
            elif protocol in ("s3", "s3a"):
                from launch.store.s3 import S3Backend, s3_options  # s3fs only where S3 is used

                self._backend = S3Backend(path, s3_options(options, userinfo), timeout_s)
            else:
                import fsspec

                if userinfo:
                    options.setdefault("username", userinfo[0])
                    if userinfo[1]:
                        options.setdefault("password", userinfo[1])
                fs = fsspec.filesystem(protocol, **options)
                self._backend = FsspecBackend(fs, fs._strip_protocol(f"{protocol}://{path}"))

    def config(self) -> dict[str, Any]:
        """The constructor's arguments: another process (the uploader) opens the same store with them.
        They may hold credentials from the URL: pass them over a pipe, never write them anywhere."""
        return dict(self._config)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, backend={self._backend.kind}, attempt={self.attempt!r})"

    # -- fencing ---------------------------------------------------------------------------------

    def claim(self, owner: str) -> int:
        """Make ``owner`` (an attempt: a SLURM job and its restart count) the run's newest attempt and
        fence this store's commits by it; its generation.

        The generation goes into ``latest`` by compare-and-swap (a pointer naming no checkpoint where
        the run has none yet), and a record of it under ``claims/`` *before*: an owner that claimed once
        (its torchrun restarting workers) keeps its generation, and one that a later owner has passed
        raises :class:`Superseded`, so a stale attempt can never claim its way back ahead. Where
        ``latest`` is missing or garbled, the newest record stands in for it.
        """
        if not ATTEMPT_RE.match(owner):
            raise ValueError(f"owner {owner!r} must match {ATTEMPT_RE.pattern}")
        record = f"{CLAIMS_DIR}/{owner}.json"
        fresh = False  # a record written by this call: a lost race is not a supersession
        with self._redactor.guard():
            for _ in range(_CAS_MAX_TRIES):
                ptr, token, _problem = self._read_pointer()
                have, holder = (ptr["generation"], ptr.get("owner")) if ptr else (0, None)
                if holder == owner:
                    generation = have
                    break
                if ptr is None:  # a new run, or its latest deleted or garbled: the records go on rising
                    have, holder = self._newest_other_claim(owner)
                mine = None if fresh else claimed_generation(self._backend.get(record))
                if mine is not None and mine <= have:
                    raise Superseded(
                        f"attempt {holder} took over this run (claim {have}) after this attempt "
                        f"{owner} (claim {mine}); this attempt stops"
                    )
                generation, fresh = max(have, mine or 0) + 1, True
                self._backend.put(record, claim_body(owner, generation))
                base = ptr or {"format": POINTER_FORMAT, "step": None, "prefix": None}
                # ``updated`` stays the commit's: pixpro status reads it as the checkpoint's time
                claimed = {**base, "generation": generation, "owner": owner}
                body = pointer_body({"updated": time.time(), **claimed})
                if self._backend.put_if(LATEST, body, token):
                    break
                self.cas_conflicts += 1
                time.sleep(_JITTER.uniform(0.005, 0.05))
            else:
                raise StoreError(f"could not claim the run for {owner} after {_CAS_MAX_TRIES} conflicts")
        self.claimed = (owner, generation)
        self._config["claimed"] = self.claimed
        log.info("%s: attempt %s holds the run (claim %d)", self.url, owner, generation)
        return generation

    def _newest_other_claim(self, owner: str) -> tuple[int, str | None]:
        """(generation, owner) of the newest claim on record by another owner than ``owner``; (0, None)."""
        newest: tuple[int, str | None] = (0, None)
        for key in self._backend.scan(CLAIMS_DIR):
            name = key.rpartition("/")[2].removesuffix(".json")
            generation = claimed_generation(self._backend.get(key)) if name != owner else None
            if generation is not None and generation > newest[0]:
                newest = (generation, name)
        return newest

    # -- writing ---------------------------------------------------------------------------------

    def prefix(self, step: int) -> str:
        """The never-reused folder of ``step`` for this attempt."""
        if not (isinstance(step, int) and 0 <= step <= MAX_STEP):
            raise ValueError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
        return f"step-{step:012d}.{self.attempt}"

    def write(
        self, step: int, name: str, data: bytes | bytearray | memoryview | Callable[[IO[bytes]], Any]
    ) -> FileEntry:
        """Upload one file of checkpoint ``step``; safe to call from a background thread or process.

        ``data`` is bytes, or a callable that writes into a binary file object (``lambda f: torch.save(
        state, f)``): its output is hashed and streamed to the store in bounded pieces (no second full
        copy in memory), and an exception in the serializer aborts the upload, so it never leaves a
        partial object behind (unlike ``with fs.open(path, "wb")`` on s3fs).
        """
        if not (isinstance(name, str) and NAME_RE.match(name)) or name == MANIFEST:
            raise ValueError(f"bad checkpoint file name {name!r}")
        prefix = self.prefix(step)
        with self._redactor.guard():
            if self._backend.exists(f"{prefix}/{MANIFEST}"):
                raise CheckpointExists(
                    f"step {step} is already committed under {prefix}; use a new attempt id per launch"
                )
            if callable(data):
                out = _HashingWriter(self._backend.open_sink(f"{prefix}/{name}"))
                try:
                    data(out)  # type: ignore[arg-type]
                    out.sink.finish()
                except BaseException as e:
                    out.sink.abort()
                    if out.error is not None and out.error is not e:
                        # torch.save reports a failed write as "unexpected pos": raise the cause
                        raise out.error from e
                    raise
                size, digest = out.size, out.sha.hexdigest()
            else:
                payload = bytes(data) if not isinstance(data, bytes) else data
                size, digest = len(payload), hashlib.sha256(payload).hexdigest()
                self._backend.put(f"{prefix}/{name}", payload)
        log.debug("%s: wrote %s/%s (%d bytes)", self.url, prefix, name, size)
        return FileEntry(name, size, digest)

    def commit(
        self, step: int, entries: list[FileEntry], meta: dict[str, Any], wait_s: float = 600
    ) -> Manifest:
        """Make ``step`` a checkpoint: wait for every rank's file, write the manifest, move ``latest``, prune.

        ``meta`` should carry what a resume must check (world size, spec hash, code version); it is
        stored as given (credential-like keys or values are refused). Raises :class:`CommitTimeout` if
        some file is still missing after ``wait_s``; nothing is committed then. ``latest`` is moved only
        forward: a commit of a step at or below the one ``latest`` names leaves it alone (logged) and
        returns the (valid, committed) manifest anyway; pruning happens only after a forward move.
        """
        prefix = self.prefix(step)
        entries = sorted(entries, key=lambda e: e.name)
        names = [e.name for e in entries]
        if not entries or len(set(names)) != len(names):
            raise ValueError("commit needs a non-empty list of entries with unique names")
        self._redactor.check_meta(meta)
        with self._redactor.guard():
            self._wait_for_files(step, prefix, entries, wait_s)
            self._fence(self._read_pointer()[0])  # a stale attempt leaves no manifest either
            manifest = Manifest(step, prefix, self.attempt, time.time(), tuple(entries), dict(meta))
            body = manifest.to_json()
            self._redactor.check_no_secrets(body)
            if not self._backend.put_if(f"{prefix}/{MANIFEST}", body, None):
                existing = self._backend.get(f"{prefix}/{MANIFEST}")
                # A retried PUT whose first try landed (answer lost) gets 412 on its own manifest; so does
                # a commit() called again after such a try failed, with a later ``created``: that
                # manifest is ours, and committing goes on with it (``latest`` still has to move).
                mine = existing is not None and same_commit(existing[0], manifest)
                if existing is None or not mine:
                    raise CheckpointExists(f"step {step}: {prefix}/{MANIFEST} already exists")
                body, manifest = existing[0], Manifest.from_json(existing[0])
            moved = self._advance_latest(manifest, hashlib.sha256(body).hexdigest())
        if moved:
            try:
                self._prune()
            except Exception as e:  # the checkpoint is committed; a failed cleanup must not undo that
                log.warning(
                    "%s: pruning old checkpoints failed: %s",
                    self.url,
                    self._redactor.redact(one_line(repr(e))),
                )
        log.info(
            "%s: committed step %d (%s, %d files)%s",
            self.url,
            step,
            prefix,
            len(entries),
            "" if moved else "; latest not moved",
        )
        return manifest

    def _wait_for_files(self, step: int, prefix: str, entries: list[FileEntry], wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        delay = 0.1
        while True:
            present = {k.partition("/")[2]: s for k, s in self._backend.scan(prefix).items()}
            problems = [
                f"{e.name} (absent)"
                if e.name not in present
                else f"{e.name} ({present[e.name]} of {e.size} bytes)"
                for e in entries
                if present.get(e.name) != e.size
            ]
            if not problems:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommitTimeout(
                    f"step {step}: after {wait_s:g} s still waiting for {len(problems)} file(s): "
                    + one_line(", ".join(problems), MAX_LINE)
                )
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 5.0)

    def _read_pointer(self) -> tuple[dict[str, Any] | None, str | None, str | None]:
        """(pointer, token, problem): a missing ``latest`` is normal, a garbled one is a problem."""
        got = self._backend.get(LATEST)
        if got is None:
            return None, None, None
        body, token = got
        try:
            return parse_pointer(body), token, None
        except ValueError as e:
            return None, token, f"'{LATEST}' is unreadable ({one_line(str(e), 80)}); ignoring it"

    def _fence(self, ptr: dict[str, Any] | None) -> None:
        """Raise :class:`Superseded` if a later attempt has claimed the run since this store's claim."""
        if ptr is not None and self.claimed is not None and ptr["generation"] > self.claimed[1]:
            raise Superseded(
                f"attempt {ptr.get('owner')} took over this run (claim {ptr['generation']}) from this "
                f"attempt {self.claimed[0]} (claim {self.claimed[1]}); this attempt stops"
            )

    def _advance_latest(self, manifest: Manifest, manifest_sha: str) -> bool:
        new = {
            "format": POINTER_FORMAT,
            "step": manifest.step,
            "prefix": manifest.prefix,
            "attempt": manifest.attempt,
            "manifest_sha256": manifest_sha,
        }
        for _ in range(_CAS_MAX_TRIES):
            ptr, token, _problem = self._read_pointer()
            self._fence(ptr)
            owner, generation = self.claimed or ((ptr or {}).get("owner"), (ptr or {}).get("generation", 0))
            body = pointer_body({**new, "generation": generation, "owner": owner, "updated": time.time()})
            if ptr is not None and ptr["prefix"] is not None:
                if ptr["prefix"] == manifest.prefix:
                    return True  # our own earlier try landed
                if ptr["step"] >= manifest.step:
                    log.warning(
                        "%s: latest names step %d (%s); not moving it to step %d (%s): stale attempt?",
                        self.url,
                        ptr["step"],
                        ptr["prefix"],
                        manifest.step,
                        manifest.prefix,
                    )
                    return False
            if self._backend.put_if(LATEST, body, token):
                return True
            self.cas_conflicts += 1
            log.info("%s: latest changed while moving it to step %d; retrying", self.url, manifest.step)
            time.sleep(_JITTER.uniform(0.005, 0.05))
        raise StoreError(f"could not move latest to step {manifest.step} after {_CAS_MAX_TRIES} conflicts")

    def _prune(self) -> None:
        """Delete checkpoints older than the newest ``keep_last`` valid ones, and junk below them."""
        layout = scan_layout(self._backend.scan())
        ptr, _, _ = self._read_pointer()
        latest_prefix = ptr["prefix"] if ptr else None
        kept: list[str] = []
        for prefix in sorted(layout.prefixes, key=step_order, reverse=True):
            if MANIFEST in layout.prefixes[prefix] and isinstance(self._validate(prefix, layout), Manifest):
                kept.append(prefix)
                if len(kept) == self.keep_last:
                    break
        if len(kept) < self.keep_last:
            return
        floor = step_of(kept[-1])
        for prefix in sorted(layout.prefixes, key=step_order):
            if step_of(prefix) < floor and prefix != latest_prefix and prefix not in kept:
                self._delete_prefix(prefix, layout.prefixes[prefix])
                log.info("%s: pruned %s", self.url, prefix)

    def _delete_prefix(self, prefix: str, files: dict[str, int]) -> None:
        # Manifest first: a half-deleted checkpoint then reads as uncommitted, never as complete.
        if MANIFEST in files:
            self._backend.delete([f"{prefix}/{MANIFEST}"])
        rest = [f"{prefix}/{n}" for n in files if n != MANIFEST]
        if rest:
            self._backend.delete(rest)

    # -- reading ---------------------------------------------------------------------------------

    def latest(self) -> dict[str, Any] | None:
        """The ``latest`` pointer as stored (step, prefix, attempt, updated), or None: no checkpoint."""
        with self._redactor.guard():
            return _named(self._read_pointer()[0])

    def latest_manifest(self) -> Manifest | None:
        """The manifest ``latest`` names, without a listing and without warnings; None on any doubt.

        For reading ahead (a resume's download while the model is built); :meth:`candidates` still
        decides what is loaded.
        """
        try:
            with self._redactor.guard():
                ptr = _named(self._read_pointer()[0])
                got = self._backend.get(f"{ptr['prefix']}/{MANIFEST}") if ptr else None
        except Exception:
            return None
        if ptr is None or got is None or ptr.get("manifest_sha256") != hashlib.sha256(got[0]).hexdigest():
            return None
        try:
            return Manifest.from_json(got[0])
        except ValueError:
            return None

    def resolve(
        self, expect: dict[str, Any] | None = None, *, verify_checksums: bool = False
    ) -> Manifest | None:
        """The checkpoint to resume from, or None: ``latest`` if it validates, else the newest valid one."""
        return next(self.candidates(expect, verify_checksums=verify_checksums), None)

    def candidates(
        self, expect: dict[str, Any] | None = None, *, verify_checksums: bool = False
    ) -> Iterator[Manifest]:
        """Valid checkpoints to try in order: ``latest`` first, then the others newest step first.

        Validation is lazy (a candidate is checked when reached) and checks that every file is present
        with its manifest size and that ``meta`` matches ``expect``; ``verify_checksums`` also downloads
        and hashes every file. Each skipped candidate costs exactly one warning line.

        ``latest`` is read before the listing, so the checkpoint it names is listed; a reader beside a
        training run (export, eval, status) can still see every checkpoint it listed pruned by the
        trainer's next commits before it reads them. If none was valid and ``latest`` has moved since,
        it looks again (at most :data:`RESOLVE_PASSES` times).
        """
        for _ in range(RESOLVE_PASSES):
            with self._redactor.guard():
                raw, _, problem = self._read_pointer()
                ptr = _named(raw)
                layout = scan_layout(self._backend.scan())
            found = False
            for manifest in self._candidates(ptr, problem, layout, expect, verify_checksums):
                found = True
                yield manifest
            if found:
                return
            with self._redactor.guard():
                now = _named(self._read_pointer()[0])
            if now is None or now == ptr:
                return
            log.info("%s: latest moved to step %d while resolving; looking again", self.url, now["step"])

    def _candidates(
        self,
        ptr: dict[str, Any] | None,
        problem: str | None,
        layout: Layout,
        expect: dict[str, Any] | None,
        verify_checksums: bool,
    ) -> Iterator[Manifest]:
        if layout.foreign:
            shown = ", ".join(layout.foreign[:5]) + (", …" if len(layout.foreign) > 5 else "")
            log.warning("%s: ignoring %d foreign object(s): %s", self.url, len(layout.foreign), shown)
        if problem:
            log.warning("%s: %s", self.url, problem)
        order: list[tuple[str, dict[str, Any] | None]] = [(ptr["prefix"], ptr)] if ptr else []
        order += [(p, None) for p in sorted(layout.prefixes, key=step_order, reverse=True)]
        seen: set[str] = set()
        for prefix, via in order:
            if prefix in seen:
                continue
            seen.add(prefix)
            with self._redactor.guard():
                result = self._validate(prefix, layout, expect, via, verify_checksums)
            if isinstance(result, Manifest):
                yield result
            else:
                log.warning(
                    "%s: skipping step %d (%s%s): %s",
                    self.url,
                    step_of(prefix),
                    prefix,
                    ", named by latest" if via else "",
                    result,
                )

    def _validate(
        self,
        prefix: str,
        layout: Layout,
        expect: dict[str, Any] | None = None,
        ptr: dict[str, Any] | None = None,
        verify_checksums: bool = False,
    ) -> Manifest | str:
        """The manifest if ``prefix`` is a complete checkpoint, else the reason (one line) why not."""
        files = layout.prefixes.get(prefix)
        if not files:
            return "no such checkpoint (its folder is missing or empty)"
        if MANIFEST not in files:
            return "no manifest.json (uncommitted: upload interrupted or still in progress)"
        got = self._backend.get(f"{prefix}/{MANIFEST}")
        if got is None:
            return "manifest.json disappeared while resolving (pruned concurrently?)"
        body = got[0]
        if ptr and ptr.get("manifest_sha256") not in (None, hashlib.sha256(body).hexdigest()):
            return "manifest.json differs from the one latest recorded"
        try:
            m = Manifest.from_json(body)
        except ValueError as e:
            return f"manifest.json is invalid: {e}"
        if m.prefix != prefix or m.step != step_of(prefix):
            return f"manifest says step {m.step} in {m.prefix}, but it is stored in {prefix}"
        for key, want in (expect or {}).items():
            have = m.meta.get(key, "<absent>")
            if have != want:
                return f"meta {key} is {short(have)}, expected {short(want)}"
        for entry in m.files:
            size = files.get(entry.name)
            if size is None:
                return f"file {entry.name} is missing"
            if size != entry.size:
                return f"file {entry.name} is {size} bytes, manifest says {entry.size}"
        if verify_checksums:
            for entry in m.files:
                try:
                    self._read_verified(m, entry.name)
                except CorruptCheckpoint as err:
                    return err.reason
        return m

    def read(self, manifest: Manifest, name: str) -> bytes:
        """File ``name`` of a committed checkpoint, verified against the manifest's size and sha256."""
        with self._redactor.guard():
            return self._read_verified(manifest, name)

    def _read_verified(self, manifest: Manifest, name: str) -> bytes:
        entry = manifest.entry(name)
        data = self._backend.read(f"{manifest.prefix}/{name}")
        if data is None:
            raise CorruptCheckpoint(manifest.step, manifest.prefix, f"file {name} is missing")
        if len(data) != entry.size:
            raise CorruptCheckpoint(
                manifest.step,
                manifest.prefix,
                f"file {name} is {len(data)} bytes, manifest says {entry.size}",
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise CorruptCheckpoint(
                manifest.step,
                manifest.prefix,
                f"file {name} has sha256 {digest[:16]}…, manifest says {entry.sha256[:16]}…",
            )
        return data

    def load_latest(
        self, names: Iterable[str] | None = None, expect: dict[str, Any] | None = None
    ) -> tuple[Manifest, dict[str, bytes]] | None:
        """Read ``names`` (default: all files) from the newest checkpoint whose files all verify.

        A checkpoint that fails (checksum, truncation, a file this rank needs is not in it) is skipped
        with one warning line and the next older one is tried; None when nothing usable exists. With
        several ranks, make them agree on the chosen step (e.g. all-reduce MIN) before using the result.
        """
        wanted = None if names is None else list(names)
        for m in self.candidates(expect):
            want = list(m.names) if wanted is None else wanted
            absent = [n for n in want if n not in m.names]
            if absent:
                log.warning(
                    "%s: skipping step %d (%s): it has no file %s",
                    self.url,
                    m.step,
                    m.prefix,
                    ", ".join(absent),
                )
                continue
            try:
                return m, {n: self.read(m, n) for n in want}
            except CorruptCheckpoint as e:
                log.warning("%s: skipping %s", self.url, e)
        return None

    def read_uncommitted(self, step: int, name: str, wait_s: float = 0.0) -> bytes | None:
        """File ``name`` of this attempt's not-yet-committed ``step`` (waiting up to ``wait_s`` for it).

        For the committing rank to collect what the other ranks wrote (their file entries) without a
        collective, so serializing and uploading can run on background threads.
        """
        if not (isinstance(name, str) and NAME_RE.match(name)) or name == MANIFEST:
            raise ValueError(f"bad checkpoint file name {name!r}")
        rel = f"{self.prefix(step)}/{name}"
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            with self._redactor.guard():
                data = self._backend.read(rel)
            if data is not None or time.monotonic() >= deadline:
                return data
            time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 1.5, 2.0)

    # -- auxiliary objects ---------------------------------------------------------------------------

    def put_aux(self, rel: str, data: bytes) -> None:
        """Overwrite a small auxiliary object (``status.json``, ``metrics/...``) as one whole object.

        Not part of any checkpoint and never pruned; the top-level name must be one of ``AUX_TOP`` so
        that ``resolve`` can tell these objects from foreign ones.
        """
        self._check_aux(rel)
        with self._redactor.guard():
            self._backend.put(rel, bytes(data))

    def read_aux(self, rel: str) -> bytes | None:
        """An auxiliary object's bytes, or None if it does not exist."""
        self._check_aux(rel)
        with self._redactor.guard():
            return self._backend.read(rel)

    def list_aux(self, sub: str) -> list[str]:
        """Relative paths (usable with ``read_aux``) of the auxiliary objects below folder ``sub``."""
        self._check_aux(sub)
        with self._redactor.guard():
            return sorted(k for k in self._backend.scan(sub) if not k.rpartition("/")[2].startswith("."))

    def delete_aux(self, rel: str) -> None:
        """Remove an auxiliary object (absent is fine)."""
        self._check_aux(rel)
        with self._redactor.guard():
            self._backend.delete([rel])

    @staticmethod
    def _check_aux(rel: str) -> None:
        if not (isinstance(rel, str) and AUX_RE.match(rel) and rel.split("/")[0] in AUX_TOP):
            raise ValueError(f"auxiliary path {rel!r} must lie under one of {sorted(AUX_TOP)}")

    def close(self) -> None:
        """Release the backend's resources."""
        self._backend.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _named(ptr: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pointer if it names a checkpoint: readers ignore an attempt's claim on a run without one."""
    return ptr if ptr is not None and ptr["prefix"] is not None else None
