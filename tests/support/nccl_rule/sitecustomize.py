"""NCCL's device rule for CPU test runs: put this folder first on PYTHONPATH and every process builds
its default process group as ``"cuda:gloo"``, whatever backend the code asks for.

Such a group refuses a CPU tensor exactly as NCCL does (``No backend type associated with device type
cpu``), so a CPU run under this rule fails wherever the GPU job would: a control-plane collective on the
default group, a barrier, a broadcast of Python objects. gloo alone accepts them all, which is how a
multi-GPU job could crash at its first step while every CPU test passed.

Applied when ``torch.distributed`` is first imported (not here: this file runs in every Python process
of the test, most of which never import torch); each patched process says so once on stderr
(:data:`MARKER`), so a test can tell that the rule was on. The repository root must be on PYTHONPATH
too (``tests.support.trainer.trainer_env`` puts it there).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from tests.support.import_hook import after_import

MARKER = "nccl-rule: default process group built as cuda:gloo"


def _patch(dist: ModuleType) -> None:
    original = dist.init_process_group

    def init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        print(f"{MARKER} (asked for {backend!r})", file=sys.stderr, flush=True)
        return original("cuda:gloo", *args, **kwargs)

    dist.init_process_group = init_process_group  # type: ignore[attr-defined]


after_import("torch.distributed", _patch)
