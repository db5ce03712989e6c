"""The PixPro trainer: one process per rank, started by torchrun (or alone for a single process).

    python -m torch.distributed.run --nproc-per-node 2 -m launch.train SPEC --run-dir DIR

Reads top to bottom: build everything from the spec, resume from the newest committed checkpoint,
then step until done or preempted. Every schedule is a pure function of the global step, so a resumed
run continues exactly where it stopped (bitwise on CPU with a fixed thread count).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import rich.style  # noqa: F401  (see below)
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from launch import heartbeat, uploader
from launch.batches import PREFETCH, loader_collate, release
from launch.builders import (
    attempt_id,
    attempt_owner,
    build_data,
    build_model,
    build_optimizer,
    checkpoint_url,
    data_storage_options,
    device_views,
    seed_everything,
)
from launch.checkpoint import FINAL_FLUSH_S, Checkpointer
from launch.collectives import Collectives, DistEnv, bind_device, collective_timeout_s
from launch.monitor import KnnMonitor
from launch.nonfinite import Diverged, NonFiniteGuard
from launch.preempt import EXIT_PREEMPTED, PreemptionFlag, die_with_parent, ignore_preemption_signals
from launch.records import MetricsLog, last_knn, read_metrics, write_status
from launch.rng import capture_rng, restore_rng
from launch.sinks import MetricSinks, sink_factories
from launch.store import CheckpointStore, StoreError, Superseded
from launch.store.backends import failure_cause
from launch.train_state import Schedule, TrainState
from pixpro.data import DatasetError, DataUnavailable
from pixpro.sync_batchnorm import convert_sync_batchnorm
from pixpro.torch_compat import no_forward_buffer_sync
from schemas import RunSpec, SpecError, hang_timeout_s, load_spec, spec_hash
from schemas.contract import (
    AGENT_PID_ENV,
    EXIT_DIR_ENV,
    PREEMPT_ENV,
    STEP_PAUSE_ENV,
    STOP_AT_STEP_ENV,
    Exit,
    exit_marker,
    preemption_deadlines,
    preemption_signals,
    preemption_window,
)

log = logging.getLogger("pixpro.train")
SINK_CLOSE_S = {
    "preempted": 2.0,
    "completed": 10.0,
    "diverged": 10.0,
    "superseded": 2.0,
}  # how long the metric mirrors get to close
# rich draws from the process-wide `random` when first imported (rich.style's id counter). httpx imports
# it, and aiobotocore imports httpx when installed (wandb brings it): on the first S3 call, after
# seeding, which would shift the RNG a checkpoint saves. Imported above, the draw comes before seeding.


def failure_line(exc: BaseException) -> str:
    """One line for the log: a DataLoader worker's error comes back with the worker's traceback in its
    message, whose last line is the error itself."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def fixed_buckets(device: torch.device, spec: RunSpec) -> bool:
    """Whether DDP keeps its first gradient-bucket layout (``find_unused_parameters``): wherever a resume
    must repeat the run bit for bit (:meth:`Trainer.distributed_model`)."""
    return device.type != "cuda" or spec.deterministic


class Trainer:
    def __init__(
        self,
        spec: RunSpec,
        run_dir: Path,
        env: DistEnv,
        flag: PreemptionFlag,
        collectives: Collectives | None = None,
        device: torch.device | None = None,
        spare_uploader: uploader.Started | None = None,
    ) -> None:
        self.spec, self.run_dir, self.env, self.flag = spec, run_dir, env, flag
        self.collectives = collectives or Collectives()
        owner = attempt_owner(self.collectives)
        self.attempt = attempt_id(owner)
        self.store = CheckpointStore(
            checkpoint_url(spec, run_dir),
            spec.checkpoint.storage_options,
            keep_last=spec.checkpoint.keep_last,
            attempt=self.attempt,
        )
        self._claim(owner)
        self.checkpointer = Checkpointer(self.store, env.rank, env.world_size, spare=spare_uploader)
        self.checkpointer.prefetch()  # a resume's download overlaps building the data and the model
        self.metrics = MetricsLog(self.store, self.attempt) if env.rank == 0 else None
        self.sinks = MetricSinks(sink_factories(spec, run_dir, self.attempt)) if env.rank == 0 else None
        self.device = device or bind_device(env)
        cuda = self.device.type == "cuda"
        if spec.threads and not cuda:
            torch.set_num_threads(spec.threads)
        if not cuda and spec.precision != "fp32" and not spec.cpu_autocast and env.rank == 0:
            log.info("precision %s applies on GPU or with cpu_autocast; this trains in fp32", spec.precision)
        fast = cuda or spec.cpu_autocast
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision) if fast else None
        self.memory_format = torch.channels_last if (fast and spec.channels_last) else torch.contiguous_format

        seed_everything(spec.seed, env.rank)  # a fresh start is reproducible; a resume restores the RNG
        heartbeat.beat(0, "data")  # start-up phases: a stall in one is named in the watchdog's line
        self.dataset, self.sampler = build_data(spec, env, self.collectives)
        self.model = build_model(spec).to(self.device).to(memory_format=self.memory_format)
        if env.world_size > 1:  # the same synchronized BN on gloo (CPU) as on NCCL (GPU)
            converted = convert_sync_batchnorm(self.model, self.collectives.data_group)
            assert converted is self.model  # converted in place: the root is no BatchNorm
        self.optimizer = build_optimizer(spec, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        schedule = Schedule.make(spec, len(self.dataset), env.world_size)
        self.spec_hash = spec_hash(spec)
        self.state = TrainState(
            self.model, self.optimizer, self.scaler, self.sampler, schedule, self.spec_hash
        )
        self.resumed_step: int | None = None
        self.data_skips = 0  # samples replaced by the next usable one in this attempt (unreadable etc.)
        # The step's numbers stay on the device (reading them is a host sync that stops the CPU from
        # queueing the next step): read at log steps and before a save, see _read_step.
        self._step_values = torch.zeros(2, device=self.device)  # loss, positives of the last good step
        self.guard = NonFiniteGuard(self.model, self.optimizer, self.device)
        self._last_positives = 0.0
        self._skipped_read = 0  # the guard's skipped steps at the last read
        self._scaler_skipped_read = 0  # fp16: GradScaler's skipped steps at the last read (expected ones)
        self._stop_sigterm = False  # the agreed stop came with a SIGTERM on some rank: its window applies
        self.diverged: str | None = None  # the one line that says why the run stopped
        self.superseded: str | None = None  # why a later attempt holds the run (launch.store.Superseded)
        self._loader: DataLoader | None = None
        self.monitor = (
            KnnMonitor(
                spec.monitor,
                spec.data.crop_size,
                self.collectives,
                self.device,
                data_storage_options(spec, spec.monitor.data),
                self.amp_dtype,
                self.memory_format,
            )
            if spec.monitor is not None
            else None
        )
        self.knn: dict[str, Any] = {}  # the monitor's newest result, carried on every metrics record

    def _claim(self, owner: str) -> None:
        """Rank 0 claims the run for this attempt before anything is read or written (fencing: a stale
        attempt still training elsewhere stops at its next checkpoint, see launch.store); every rank
        raises :class:`Superseded` if a later attempt holds it already, :class:`StoreError` if the store
        did not answer (as the resume that follows would fail: an attempt never trains unfenced)."""
        refusal, failure = "", ""
        if self.env.rank == 0:
            try:
                self.store.claim(owner)
            except Superseded as exc:
                refusal = str(exc)
            except (StoreError, OSError) as exc:
                failure = f"could not claim the run for attempt {owner}: {failure_cause(exc)}"
        refusal, failure = (
            self.collectives.broadcast_bytes(f"{refusal}\0{failure}".encode()).decode().split("\0")
        )
        if refusal:
            raise Superseded(refusal)
        if failure:
            raise StoreError(failure)

    # state: the step and epoch live in the TrainState that checkpoints hold -------------------------
    @property
    def schedule(self) -> Schedule:
        return self.state.schedule

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.state.epoch = value

    def resume(self) -> None:
        heartbeat.beat(0, "resume")
        found = self.checkpointer.load_latest(self.collectives)
        if found is None:
            log.info("no committed checkpoint under %s: starting at step 0", self.store.url)
            return
        step, train_state, rank_state = found
        self.state.load_state_dict(train_state, f"the checkpoint at step {step}")
        if rank_state is not None:
            restore_rng(rank_state["rng"])
        else:
            log.warning(
                "world size changed to %d: the remaining samples are repartitioned and per-rank RNG is "
                "re-derived from (seed, step, rank)",
                self.env.world_size,
            )
            torch.manual_seed(hash((self.spec.seed, self.step, self.env.rank)) & 0x7FFF_FFFF)
        self.resumed_step = self.step
        log.info("resumed from step %d (epoch %d) of %d", self.step, self.epoch, self.schedule.total_steps)
        if self.monitor is not None and self.metrics is not None:  # the result the records carry on
            try:
                self.knn = last_knn(read_metrics(self.store), self.step)
            except Exception as exc:  # metrics are a mirror: an unreadable one never stops training
                log.warning("could not read the kNN monitor's last result: %s", failure_cause(exc))

    def save(self, blocking: bool, budget_s: float | None = None) -> bool:
        """Hand the state to the uploader; ``blocking``: wait (at most ``budget_s``), say if it committed.

        A state that is not all finite is never handed over: :class:`Diverged` is raised instead."""
        self._read_step()
        if not self.guard.state_finite():
            raise Diverged(f"the state at step {self.step} holds non-finite values; it was not saved")
        train_state = self.state.state_dict() if self.env.rank == 0 else None
        meta = {"step": self.step, "epoch": self.epoch, "spec_hash": self.spec_hash, "attempt": self.attempt}
        return self.checkpointer.save(
            self.step, train_state, {"rng": capture_rng()}, meta, blocking=blocking, budget_s=budget_s
        )

    # loop -----------------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to the end, a preemption, a divergence or a later attempt's claim: "completed",
        "preempted", "diverged" or "superseded"."""
        self.resume()
        model = self.distributed_model()
        self._status("running")
        why = None
        try:
            outcome = self._steps(model)
            committed = self._final_save(outcome) if outcome != "superseded" else False
            # a later claim found by the final save: the attempt neither completed nor may requeue
            if outcome != "superseded" and self.collectives.any(self.checkpointer.superseded is not None)[0]:
                outcome, committed = "superseded", False
        # every rank decides alike: the guard follows the reduced gradients (fp16: the agreed losses)
        except Diverged as exc:
            outcome, committed, why = "diverged", False, str(exc)
        finally:
            self._close_loader()
        self.checkpointer.close()  # an upload in flight (a finite state from before) commits or ends here
        if why is not None:  # the store's own answer: an upload that commits as it is closed reports none
            try:
                last = (self.store.latest() or {}).get("step")
            except (StoreError, OSError):
                last = self.checkpointer.last_committed or self.resumed_step
            self.diverged = (
                f"diverged: {why}; stopped without saving; the last committed checkpoint is "
                f"{f'step {last}' if last else 'none'}"
            )
            if self.env.rank == 0:
                log.error("%s", self.diverged)
        if outcome == "superseded":  # rank 0's uploader was told; its status.json is the new attempt's
            why = self.collectives.broadcast_bytes((self.checkpointer.superseded or "").encode()).decode()
            self.superseded = why or "a later attempt took over this run; this attempt stops"
        if self.metrics is not None:
            self.metrics.flush(wait=True)
        if outcome != "superseded":
            self._status(outcome, preempt_committed=committed if outcome == "preempted" else None)
        if self.sinks is not None:  # after status.json: a slow sink must not hide how the attempt ended
            self.sinks.close(timeout_s=SINK_CLOSE_S[outcome])
        log.info("%s at step %d of %d", outcome, self.step, self.schedule.total_steps)
        del model
        return outcome

    def _steps(self, model: torch.nn.Module) -> str:
        """Step until done ("completed"), or until every rank agreed on a preemption ("preempted") or on
        a later attempt's claim of the run, found by a commit ("superseded")."""
        spec = self.spec
        stop_at = int(os.environ.get(STOP_AT_STEP_ENV, -1))
        pause_s = float(os.environ.get(STEP_PAUSE_ENV) or 0.0)
        last_ckpt_time = time.monotonic()
        t_last, n_last = time.monotonic(), self.step
        progress = _progress_bar(self.schedule.total_steps, self.step) if self.env.rank == 0 else None
        try:
            while self.step < self.schedule.total_steps:
                if self.sampler.steps_remaining() == 0:
                    self.epoch += 1
                    self.sampler.set_epoch(self.epoch)
                loader = self.loader()
                for batch in loader:
                    self.data_skips += int(batch["skipped"].sum())  # a host tensor: no device sync
                    heartbeat.beat(self.step, "train")  # the node's watchdog reads it (launch.watchdog)
                    self._train_step(model, batch)
                    release(loader, batch)  # its host tensors are spent: the workers may reuse them
                    self.step += 1
                    self.sampler.advance_steps(1)
                    if self.step == stop_at:
                        self.flag.trigger()
                    if pause_s:
                        time.sleep(pause_s)
                    monitored = self._monitor()
                    t_last += monitored or 0.0  # the rate counts training alone
                    if (
                        self.step % spec.log_every_steps == 0
                        or self.step == self.schedule.total_steps
                        or monitored is not None
                    ):
                        loss = self._read_step()
                        if self.metrics is not None:
                            now = time.monotonic()
                            rate = (
                                (self.step - n_last)
                                * self.sampler.global_batch_size
                                / max(now - t_last, 1e-9)
                            )
                            t_last, n_last = now, self.step
                            self._log_metrics(loss, rate)
                        if progress is not None:
                            progress.update(self.step, loss)
                    if self.step >= self.schedule.total_steps:
                        return "completed"  # at the last step, a preemption just lets it finish
                    preempt, due, superseded, sigterm = self.collectives.any(
                        self.flag.requested(),
                        self._checkpoint_due(last_ckpt_time),
                        self.checkpointer.superseded is not None,
                        self.flag.received == signal.SIGTERM,
                    )
                    if superseded:
                        return "superseded"
                    if preempt:
                        # every rank budgets alike: one whose own signal has not come yet too
                        self._stop_sigterm = sigterm
                        return "preempted"
                    if due:
                        heartbeat.beat(self.step, "checkpoint")
                        self.save(blocking=False)
                        last_ckpt_time = time.monotonic()
            return "completed"
        finally:
            if progress is not None:
                progress.close()

    def _final_save(self, outcome: str) -> bool:
        """The attempt's last checkpoint, blocking: whether it committed (a preemption's: in its budget)."""
        if self.step == self.resumed_step:  # nothing new to save when stopped before the first step
            return True
        # A preemption must commit before SLURM's SIGKILL, counted from the signal (a monitor evaluation
        # or a long step may have come between); leave a margin for the exit.
        since = time.monotonic() - (self.flag.since or time.monotonic())
        lead = self.spec.resources.signal_lead_s
        sigterm = self._stop_sigterm
        window = preemption_window(lead, time.time() - since, sigterm) if outcome == "preempted" else None
        commit_s, _ = preemption_deadlines(lead, window)
        heartbeat.beat(self.step, "final-flush", max(self.checkpointer.final_flush_s, commit_s))
        budget_s = max(0.0, commit_s - since) if outcome == "preempted" else None
        committed = self.save(blocking=True, budget_s=budget_s)
        if outcome == "preempted" and not committed:
            log.error(
                "preempted at step %d, but its checkpoint did not commit within %.0f s of the signal "
                "(%.1f s were left when the save began; resources.signal_lead_s %g%s): "
                "the next attempt resumes from step %s",
                self.step,
                commit_s,
                budget_s,
                lead,
                "" if window is None else f", {'SIGTERM' if sigterm else 'preemption'} window {window:g} s",
                self.checkpointer.last_committed or self.resumed_step or 0,
            )
        return committed

    def distributed_model(self, find_unused: bool | None = None) -> torch.nn.Module:
        """The model as the step runs it: under DDP whenever a process group exists (one GPU under
        torchrun runs the same DDP as eight), else the model itself.

        ``find_unused`` (default: on CPUs, and on GPUs with ``deterministic``) keeps DDP from
        re-bucketing after its first backward: otherwise the first step after every (re)start reduces
        gradients in another layout, and with more than two ranks the float sums differ (gloo's shown
        at three ranks; NCCL's ring sums each chunk from another rank), breaking bitwise-exact resume.
        It reads a flag per parameter on the host each backward (benches/bench_host_syncs.py): nothing on
        a CPU; on GPUs a sync per parameter, paid only where bit-for-bit resume was asked for.
        """
        if not self.collectives.active:
            return self.model
        cuda = self.device.type == "cuda"
        return DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if cuda else None,
            process_group=self.collectives.data_group,
            # SyncBatchNorm keeps the BN buffers equal on every rank: no re-broadcast each forward (they
            # are equal at init too, so DDP's one broadcast of them there changes nothing)
            **no_forward_buffer_sync(),
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
            find_unused_parameters=fixed_buckets(self.device, self.spec)
            if find_unused is None
            else find_unused,
        )

    def _close_loader(self) -> None:
        """Stop the persistent workers now. Left to interpreter exit, multiprocessing would SIGTERM them,
        which they ignore (a preemption signal, see launch.preempt), and then wait for them forever."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader = None

    def loader(self) -> DataLoader:
        """The run's one DataLoader: its workers persist across epochs (no re-fork from a CUDA process,
        no drained pipeline at each epoch boundary). The sampler runs in this process, so a new epoch or
        a resumed position takes effect at the next ``iter()``; samples are seeded by (seed, epoch,
        index), so the workers' own RNG never matters and resume stays exact."""
        if self._loader is None:
            workers = self.spec.data.num_workers
            self._loader = DataLoader(
                self.dataset,
                batch_size=self.spec.data.batch_size,
                sampler=self.sampler,
                num_workers=workers,
                collate_fn=loader_collate(workers),  # batch buffers reused in shared memory
                prefetch_factor=PREFETCH if workers else None,
                persistent_workers=workers > 0,
                worker_init_fn=ignore_preemption_signals,
                pin_memory=self.device.type == "cuda",
                drop_last=False,
                # its own generator: creating an iterator must not draw from the global RNG
                generator=torch.Generator().manual_seed(self.spec.seed),
            )
        return self._loader

    def _train_step(self, model: torch.nn.Module, batch: dict) -> None:
        """One optimizer step, queued without a host sync (fp16's GradScaler aside, which reads its
        overflow flag): the loss and positives stay on the device until :meth:`_read_step`; a step whose
        gradients are not finite is undone on the device (:class:`NonFiniteGuard`)."""
        lr = self.schedule.lr(self.step, self.spec)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        v1, v2, c1, c2 = device_views(self.dataset.transform, batch, self.device)
        if self.memory_format is torch.channels_last:
            v1, v2 = (
                v1.contiguous(memory_format=torch.channels_last),
                v2.contiguous(memory_format=torch.channels_last),
            )
        self.guard.begin()
        # before the target forward, as the official code does
        self.model.update_target(self.schedule.momentum(self.step, self.spec))
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            out = model(v1, v2, c1, c2)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # fp16: GradScaler already skipped a step with inf gradients (expected, counted apart); the
        # guard then watches the loss, every rank's
        fp16 = self.scaler.is_enabled()
        ok = self.guard.finish(
            out["loss"], grads_checked=not fp16, every_rank=self.collectives.every_rank if fp16 else None
        )
        values = torch.stack([out["loss"].detach().float(), out["positives"].float()])
        self._step_values = torch.where(ok, values, self._step_values)

    def _read_step(self) -> float:
        """The last good step's loss on the host, and the guard's counts (one sync); raises
        :class:`Diverged` once ``optim.max_nonfinite_steps`` steps in a row were not finite."""
        read = torch.cat([self._step_values.double(), self.guard.counters().double()]).tolist()
        loss, self._last_positives, longest, skipped = read[0], read[1], int(read[2]), int(read[3])
        self._scaler_skipped_read = int(read[4])
        self.guard.mark_read()
        limit = self.spec.optim.max_nonfinite_steps
        if longest >= limit:
            raise Diverged(
                f"{longest} steps in a row were not finite (their gradients or the state they made; "
                f"optim.max_nonfinite_steps {limit}), the last at step {self.step}"
            )
        if skipped > self._skipped_read and self.env.rank == 0:
            log.warning(
                "skipped %d step(s) up to step %d: their gradients or the state they made were not finite "
                "(not applied; the run stops after %d in a row)",
                skipped - self._skipped_read,
                self.step,
                limit,
            )
        self._skipped_read = skipped
        return loss

    def _monitor(self) -> float | None:
        """Run the kNN monitor when this step is one of its multiples (every rank): its seconds, or None."""
        if self.monitor is None:
            return None
        steps_per_epoch = len(self.dataset) // self.schedule.global_batch
        if self.step % self.monitor.every(steps_per_epoch) != 0:
            return None
        started = time.monotonic()
        top1, top5 = self.monitor.evaluate(self.model.online_encoder(), self.step)
        self.knn = {"knn_top1": top1, "knn_top5": top5, "knn_step": self.step}
        seconds = time.monotonic() - started
        if self.env.rank == 0:
            log.info("kNN monitor at step %d: top-1 %.4f top-5 %.4f (%.1f s)", self.step, top1, top5, seconds)
        return seconds

    def _checkpoint_due(self, last_time: float) -> bool:
        c = self.spec.checkpoint
        by_steps = c.every_steps is not None and self.step % c.every_steps == 0
        by_time = c.every_minutes is not None and time.monotonic() - last_time >= 60 * c.every_minutes
        return by_steps or by_time

    def _log_metrics(self, loss: float, rate: float) -> None:
        assert self.metrics is not None  # rank 0 only
        rec = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss,
            "lr": self.schedule.lr(self.step - 1, self.spec),
            "ema_momentum": self.schedule.momentum(self.step - 1, self.spec),
            "img_per_s": round(rate, 2),
            "steps_per_s": round(rate / self.sampler.global_batch_size, 5),  # pixpro status: the ETA
            "positives": self._last_positives,
            "data_skips": self.data_skips,
            "skipped_steps": self._skipped_read,
            "scaler_skipped_steps": self._scaler_skipped_read if self.scaler.is_enabled() else None,
            "total_steps": self.schedule.total_steps,
            "commit_s": self.checkpointer.last_commit_s,
            "store_error": self.checkpointer.store_error,
            **self.knn,
        }
        if self.resumed_step is not None:
            rec["resumed_from"] = self.resumed_step
        self.metrics.append(rec)
        self.metrics.flush()
        if self.sinks is not None:
            self.sinks.write(rec)
        if not sys.stderr.isatty():
            log.info(
                "step %d/%d loss %.4f lr %.3g m %.5f %.1f img/s",
                self.step,
                self.schedule.total_steps,
                loss,
                rec["lr"],
                rec["ema_momentum"],
                rate,
            )

    def _status(self, state: str, preempt_committed: bool | None = None) -> None:
        if self.env.rank == 0:
            write_status(
                self.store,
                state=state,
                step=self.step,
                total_steps=self.schedule.total_steps,
                epoch=self.epoch,
                attempt=self.attempt,
                data_skips=self.data_skips,
                preempt_committed=preempt_committed,
                diverged=self.diverged,
                # at step, as a metrics record of it would say: pixpro status shows them with the step
                lr=self.schedule.lr(self.step - 1, self.spec) if self.step else None,
                ema_momentum=self.schedule.momentum(self.step - 1, self.spec) if self.step else None,
                **self.checkpointer.health(),
            )


class _progress_bar:
    """A rich progress bar on an interactive terminal; nothing otherwise (logs carry the progress)."""

    def __init__(self, total: int, start: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("pixpro"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-")
            self.bar.start()

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- entry point -----------------------------------------------------------------------------------
def set_deterministic() -> None:
    """What CUDA needs to repeat a run bit for bit (spec ``deterministic``); before CUDA initializes.

    cuBLAS picks reduction splits by workspace unless it is fixed; cuDNN autotunes (benchmark) and has
    non-deterministic algorithms; a few torch kernels (scatter-add, index-put) use atomics. On a CPU
    none of this changes anything: CPU runs are deterministic at a fixed thread count either way.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__)
    parser.add_argument("spec", type=Path, help="run spec (JSON or YAML)")
    parser.add_argument("--run-dir", type=Path, default=None, help="local run folder (default runs/<name>)")
    args = parser.parse_args(argv)
    if os.environ.get(AGENT_PID_ENV):  # a rank dies with its agent: never an orphan that trains on
        die_with_parent(int(os.environ[AGENT_PID_ENV]))
    # first, while this process has no threads: forked from here, the uploader costs no start-up of its
    # own (launch.forking); else a fresh interpreter imports torch while this one builds the run
    spare = uploader.start(fork=True)
    env = DistEnv.from_environ()
    _setup_logging(env.rank)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"pixpro: {exc}", file=sys.stderr)
        return Exit.USAGE
    if spec.deterministic:
        set_deterministic()
        log.info(
            "deterministic algorithms on (torch, cuBLAS workspace %s, cuDNN)",
            os.environ["CUBLAS_WORKSPACE_CONFIG"],
        )
    device = bind_device(env)  # before the process group: its buffers must land on this rank's GPU
    flag = PreemptionFlag(preemption_signals(spec.resources.signal)).install()
    if os.environ.get(PREEMPT_ENV):  # restarted by torchrun after the preemption signal arrived
        flag.trigger()
    run_dir = args.run_dir or Path("runs") / spec.name
    # env:// on the store of this rendezvous round (see launch.elastic: no stale keys to read)
    commit_s, _ = preemption_deadlines(spec.resources.signal_lead_s)  # the longest: a time limit's
    startup_s = spec.resources.startup_timeout_s
    heartbeat.install(env.rank, hang_timeout_s(spec), startup_s)
    timeout_s = collective_timeout_s(FINAL_FLUSH_S, commit_s, hang_timeout_s(spec), startup_s)
    collectives = Collectives.start(env, device, timeout_s)
    try:
        trainer = Trainer(spec, run_dir, env, flag, collectives, device, spare)
        outcome = trainer.fit()
        reason = trainer.diverged or trainer.superseded or ""
    except (SpecError, DatasetError) as exc:  # bad input: one line, no traceback, no barrier to hang in
        log.error("%s", exc)
        return Exit.USAGE
    except Superseded as exc:  # a later attempt claimed the run before this one began
        outcome, reason = "superseded", str(exc)
    except (StoreError, DataUnavailable) as exc:
        # the store or the data did not answer (retried within each read): one line (a loader worker's
        # error comes with its traceback, whose last line is its own); torchrun restarts the workers
        # where resources.max_restarts allows
        log.error("%s", failure_line(exc))
        return Exit.FAILURE
    if outcome == "superseded" and env.rank == 0:
        log.error("%s", reason)
    # A preemption signal that arrives while the interpreter shuts down would otherwise kill us with
    # its default action (Python drops its handlers at exit) and turn a finished run into a failure.
    for sig in flag.signals:
        signal.signal(sig, signal.SIG_IGN)
    collectives.close()
    if outcome in ("preempted", "diverged", "superseded"):
        exit_dir = os.environ.get(EXIT_DIR_ENV)
        if exit_dir:  # under our torchrun wrapper: exit 0 so torchrun does not restart us (a restart would
            # only repeat a divergence); the wrapper reports the outcome (75, or 1 with the reason)
            Path(exit_dir, exit_marker(outcome, env.rank)).write_text(reason)
            return Exit.OK
        return EXIT_PREEMPTED if outcome == "preempted" else Exit.FAILURE
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
