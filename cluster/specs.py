"""The spec a command acts on: the file, ``--set`` overrides and ``--nodes``/``--gpus``, validated once.

Apart from :mod:`cluster.runs` so that ``pixpro validate`` imports the spec models and nothing of
submitting (executors, stores, the run index).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from schemas import RunSpec, SpecError, apply_overrides, load_spec_data, parse_spec


def resolve_spec(
    path: Path, nodes: int | None = None, gpus: int | None = None, overrides: Sequence[str] = ()
) -> RunSpec:
    """Load the file, apply ``--set`` overrides and ``--nodes``/``--gpus``, validate once (SpecError:
    exit 2). A problem with a value that came from a flag names the flag, so the user fixes the
    command line rather than the file."""
    data = apply_overrides(load_spec_data(path), tuple(overrides))
    flags: dict[str, str] = {}
    for dotted in overrides:
        key = dotted.partition("=")[0].strip()
        flags[key] = f"--set {key}"
    for key, value, flag in (("nodes", nodes, "--nodes"), ("gpus_per_node", gpus, "--gpus")):
        resources = data.setdefault("resources", {})
        if value is not None and isinstance(resources, dict):  # else the spec error about it stands
            resources[key] = value
            flags[f"resources.{key}"] = flag
    try:
        return parse_spec(data)
    except SpecError as exc:
        lines = []
        for line in exc.problems:
            for key, flag in flags.items():
                if line.startswith(key + ":") and not flag.startswith("--set"):
                    line = f"{flag} ({key}){line[len(key) :]}"
                elif line.startswith(key + ":"):
                    line = f"{line} (from {flag})"
            lines.append(line)
        raise SpecError(lines) from None


def spec_json(spec: RunSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
