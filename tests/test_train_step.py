"""The training step as a GPU sees it: no host sync per step, a non-finite loss never saved, the loader's
workers kept for the whole run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from launch.builders import build_model, seed_everything
from launch.collectives import DistEnv
from launch.nonfinite import Diverged, NonFiniteGuard
from launch.preempt import PreemptionFlag
from launch.train import Trainer, failure_line, fixed_buckets
from pixpro.data import DataUnavailable
from schemas import load_spec, parse_spec
from tests.support import zygote
from tests.support.host_syncs import HostSyncCounter
from tests.support.trainer import tiny_spec, write_spec


@pytest.fixture
def make_trainer(tmp_path: Path, data_root: Path) -> Iterator:
    made: list[Trainer] = []

    def make(**overrides: object) -> Trainer:
        spec = tiny_spec(data_root, **({"log_every_steps": 100} | overrides))
        trainer = Trainer(
            load_spec(write_spec(tmp_path / "spec.json", spec)),
            tmp_path / f"run{len(made)}",
            DistEnv(0, 0, 1),
            PreemptionFlag(()),
            spare_uploader=zygote.uploader(),
        )
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.checkpointer.close()


def _batches(trainer: Trainer) -> Iterator[dict]:
    return iter(trainer.loader())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_a_training_step_makes_no_host_sync(make_trainer, autocast):
    """A host sync per step (reading the loss) stops the CPU from queueing the next step while the GPU
    finishes this one. Counted on CPU tensors: the ops that would sync on a GPU (item, tolist, boolean
    masks, nonzero...), the backward and LARS included."""
    trainer = make_trainer(precision="bf16" if autocast else "fp32", cpu_autocast=autocast)
    assert (trainer.amp_dtype is torch.bfloat16) is autocast
    batches = _batches(trainer)
    for _ in range(3):
        batch = next(batches)
        with HostSyncCounter() as counter:
            trainer._train_step(trainer.model, batch)
        assert counter.count == 0, dict(counter.ops)
        trainer.step += 1
    with HostSyncCounter() as counter:
        loss = trainer._read_step()  # at log steps only: one sync for every number of the step
    assert counter.count == 1 and math.isfinite(loss)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    bufs = {f"opt.{i}": s["momentum_buffer"].clone() for i, s in enumerate(trainer.optimizer.state.values())}
    return model | bufs


def test_a_step_with_non_finite_gradients_is_not_applied(make_trainer):
    """The step is undone on the device: weights, momentum and BN statistics (changed in the forward
    already) are bitwise what they were; the next finite step trains as if the bad one never ran."""
    trainer = make_trainer()
    batches = _batches(trainer)
    for _ in range(2):
        trainer._train_step(trainer.model, next(batches))
        trainer.step += 1
    before = _state(trainer)
    bad = next(batches)
    bad["view1"] = bad["view1"].clone()
    bad["view1"].view(-1)[0] = 255  # a finite input; the poison goes in through the normalization below
    mean = trainer.dataset.transform.view1.photometric
    original = mean.normalize
    mean.normalize = lambda v: original(v) * float("inf")  # type: ignore[method-assign]
    trainer._train_step(trainer.model, bad)
    mean.normalize = original  # type: ignore[method-assign]
    trainer.step += 1
    after = _state(trainer)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert math.isfinite(trainer._read_step())
    # one skipped in all; the run of bad steps it ended on carries over the read
    assert trainer.guard.counters().tolist() == [1, 1, 0]  # no GradScaler skip: not fp16
    trainer._train_step(trainer.model, next(batches))  # finite again: the run is over
    assert trainer.guard.run.item() == 0


def test_a_state_that_is_not_finite_is_never_saved(make_trainer):
    trainer = make_trainer()
    batches = _batches(trainer)
    trainer._train_step(trainer.model, next(batches))
    trainer.step += 1
    with torch.no_grad():
        next(trainer.model.backbone.parameters()).fill_(float("nan"))  # the first conv's weight
    trainer._train_step(trainer.model, next(batches))
    trainer.step += 1
    with pytest.raises(Diverged, match="state at step 2 holds non-finite values"):
        trainer.save(blocking=True)
    assert trainer.checkpointer.last_committed is None


def test_the_loader_keeps_its_workers_across_epochs(make_trainer):
    """Workers forked once for the run (not from a CUDA process every epoch); the next epoch's batches
    are still exactly those of its own sampler position."""
    trainer = make_trainer(data__num_workers=2)
    loader = trainer.loader()
    first = list(loader)
    iterator = loader._iterator
    assert iterator is not None
    pids = [w.pid for w in iterator._workers]
    trainer.sampler.set_epoch(1)
    second = [b["view1"].clone() for b in trainer.loader()]
    assert trainer.loader() is loader and loader._iterator is iterator
    assert [w.pid for w in iterator._workers] == pids and all(w.is_alive() for w in iterator._workers)
    assert len(first) == len(second) == trainer.sampler.steps_per_epoch()

    fresh = make_trainer(data__num_workers=0)
    fresh.sampler.set_epoch(1)
    expected = [b["view1"] for b in fresh.loader()]
    assert all(torch.equal(a, b) for a, b in zip(second, expected, strict=True))


def test_gradscaler_skips_are_counted_apart_and_are_not_divergence():
    """fp16's GradScaler skips a step whose scaled gradients overflow (expected while its scale
    settles): the guard neither undoes nor counts it as non-finite, and counts it for the metrics."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # the first scaled loss overflows; the next scale (2**27) does not
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    guard = NonFiniteGuard(model, optimizer, torch.device("cpu"))
    weights = [[p.detach().clone() for p in model.parameters()]]
    for _ in range(2):
        guard.begin()
        loss = (model(torch.ones(3, 4)) ** 2).sum() + 10
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        assert guard.finish(loss, grads_checked=False).item()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))  # skipped
    assert not any(torch.equal(a, b) for a, b in zip(weights[1], weights[2], strict=True))  # trained
    assert scaler.get_scale() == 2.0**27
    assert guard.counters().tolist() == [0, 0, 1]


def test_the_initial_weights_come_from_the_spec_seed_and_each_ranks_stream_stays_its_own():
    """Every rank builds the same weights whatever its global stream holds, and building them leaves that
    stream (seeded per rank: a stochastic-depth backbone's masks) where it was."""
    spec = parse_spec(tiny_spec(Path("data")))
    weights = []
    for rank in (0, 1):
        seed_everything(spec.seed, rank)
        expected = torch.rand(3)
        seed_everything(spec.seed, rank)
        weights.append(build_model(spec).state_dict())
        assert torch.equal(torch.rand(3), expected)  # the rank's own stream, untouched
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize(
    ("device", "deterministic", "fixed"),
    [("cpu", False, True), ("cpu", True, True), ("cuda", True, True), ("cuda", False, False)],
)
def test_ddp_keeps_its_bucket_layout_wherever_a_resume_repeats_the_run(
    tmp_path: Path, device: str, deterministic: bool, fixed: bool
) -> None:
    """DDP re-buckets after the first backward of each process: a run resumed at step k reduces step k in
    the first layout, an uninterrupted one in the second, and at more than two ranks the sums differ.
    CPU runs and deterministic GPU runs promise bitwise resume: DDP keeps its layout there; other GPU
    runs skip the per-parameter host sync that costs."""
    spec = parse_spec(tiny_spec(tmp_path, deterministic=deterministic))
    assert fixed_buckets(torch.device(device), spec) is fixed


class _Unavailable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        raise DataUnavailable("/data: 8 reads in a row failed after retries (from image 0)")


def test_storage_that_stops_answering_in_a_loader_worker_ends_the_rank_in_one_line() -> None:
    """A loader worker's DataUnavailable reaches the trainer as itself (a restart, exit 1, not bad
    input), and its log line is the error's own, not the worker's traceback."""
    loader = torch.utils.data.DataLoader(_Unavailable(), num_workers=1)
    with pytest.raises(DataUnavailable) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what the worker sends back
    line = failure_line(caught.value)
    assert "\n" not in line and line.endswith("/data: 8 reads in a row failed after retries (from image 0)")
