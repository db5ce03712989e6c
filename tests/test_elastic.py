"""launch.elastic's replacement for the rendezvous's method-name lookup names the same frame as torch's."""

from __future__ import annotations

import inspect
from pathlib import Path

from torch.distributed.elastic.rendezvous import dynamic_rendezvous

from launch.elastic import caller_name


def torchs(depth: int = 2) -> str:
    """torch 2.14's ``dynamic_rendezvous.get_method_name``, as its source (checked below) has it."""
    if len(inspect.stack()) > depth:
        return inspect.stack()[depth].function
    return "no_method_name"


def _record(lookup):  # stands for DynamicRendezvousHandler._record: asks for its caller's name
    return lookup()


def keep_alive(lookup):
    return _record(lookup)


def test_caller_name_is_torchs_method_name_at_every_depth() -> None:
    source = Path(dynamic_rendezvous.__file__).read_text()
    assert "def get_method_name(depth=2):\n    if len(inspect.stack()) > depth:\n" in source
    assert "        return inspect.stack()[depth].function\n" in source
    assert keep_alive(caller_name) == keep_alive(torchs) == "keep_alive"
    for depth in range(1, 6):
        assert caller_name(depth) == torchs(depth), depth
    assert caller_name(10_000) == torchs(10_000) == "no_method_name"
