"""What the gpu_check "job" check learns from inside the trainer: its process groups and collectives.

Put this folder first on PYTHONPATH with ``GPU_CHECK_COLLECTIVES=<dir>``: a process that builds a
process group writes ``<dir>/rank<R>.<pid>.json`` at exit: the default group's backend configuration
(``cpu:gloo,cuda:nccl`` on a GPU), every later group's, and how many times each ``torch.distributed``
collective was called, per group and tensor device. A pass-through: every call reaches torch unchanged;
it sees the calls made through ``torch.distributed.<name>`` (the trainer's control plane, the
synchronized BatchNorm), not those made inside torch (DDP's bucket all-reduces: NCCL's own log has those).

Applied when ``torch.distributed`` is first imported, not here: most Python processes of a job (the
agent, the uploader, loader workers) never build a group and never import it for that. Another
``sitecustomize`` further down ``sys.path`` still runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from tests.support.import_hook import after_import

DIR_ENV = "GPU_CHECK_COLLECTIVES"
COLLECTIVES = (
    "all_reduce",
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
)


def _observe(dist: ModuleType, out_dir: str) -> None:
    import atexit
    import functools
    import inspect
    import json
    from collections import Counter

    calls: Counter[str] = Counter()
    record: dict[str, Any] = {"pid": os.getpid(), "groups": {}, "calls": calls}
    labels: dict[int, str] = {}

    def label(group: Any) -> str:
        if group is None or group is getattr(dist.group, "WORLD", None):
            return "default"
        return labels.get(id(group), "other")

    def device(args: tuple, kwargs: dict) -> str:
        for value in (*args, *kwargs.values()):
            if hasattr(value, "device") and hasattr(value, "dtype"):
                return str(value.device.type)
            if isinstance(value, list) and value and hasattr(value[0], "device"):
                return str(value[0].device.type)
        return "host"

    def counted(name: str, fn: Any) -> Any:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                group = signature.bind_partial(*args, **kwargs).arguments.get("group")
                calls[f"{name}@{label(group)}[{device(args, kwargs)}]"] += 1
            except Exception:  # counting must never change what the call does
                calls[f"{name}@?"] += 1
            return fn(*args, **kwargs)

        return call

    init, new_group = dist.init_process_group, dist.new_group

    @functools.wraps(init)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        result = init(*args, **kwargs)
        record.update(
            rank=dist.get_rank(), world_size=dist.get_world_size(), default_backend=dist.get_backend_config()
        )
        record["groups"]["default"] = record["default_backend"]
        atexit.register(write)
        return result

    @functools.wraps(new_group)
    def new_group_(*args: Any, **kwargs: Any) -> Any:
        group = new_group(*args, **kwargs)
        name = labels[id(group)] = f"group{len(labels) + 1}"
        record["groups"][name] = dist.get_backend_config(group)
        return group

    def write() -> None:
        path = os.path.join(out_dir, f"rank{record.get('rank', 'x')}.{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    dist.init_process_group = init_process_group  # type: ignore[attr-defined]
    dist.new_group = new_group_  # type: ignore[attr-defined]
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(name, getattr(dist, name)))


def _chain() -> None:
    """Run the ``sitecustomize`` this one shadows, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if os.environ.get(DIR_ENV):
    after_import("torch.distributed", lambda dist: _observe(dist, os.environ[DIR_ENV]))
_chain()
