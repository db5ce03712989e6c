"""Limits, patterns and tables of the run spec, shared by its models, parser and loader (no pydantic here)."""

from __future__ import annotations

CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        # the same thing for the other supported stores (gcsfs, adlfs)
        "account_key",
        "sas_token",
        "client_secret",
        "connection_string",
    }
)
"""Examples of refused keys, kept for callers; the rule itself is :mod:`schemas.secrets` (normalised key
patterns and value shapes, anywhere in the spec): credentials never go into a spec, which is copied into
job records and logs."""

MAX_SPEC_BYTES = 256 * 1024
"""Largest spec, as a file and as JSON after YAML aliases are expanded: a spec is copied into the run
record, every attempt's log and error lines, so a 500-byte alias bomb must not become megabytes."""

MAX_NODES = 20_000  # values in a spec after alias expansion (a real spec has about 100)
MAX_KEY_SHOWN = 40
MAX_SEED = 2**32 - 1
"""Seeds are numpy/torch generator seeds; the trainer derives per-rank seeds as ``seed * 1000 + rank``."""
MAX_STEPS = 10**12 - 1
"""The checkpoint store names prefixes ``step-<12 digits>``."""
MAX_THREADS = 1024

URL_SCHEMES = ("file", "s3", "gs", "az", "memory")
"""Checkpoint URL schemes the checkpoint store supports (besides a plain path)."""

OWNED_SBATCH_OPTIONS: dict[str, str] = {
    "nodes": "set from resources.nodes",
    "ntasks": "pixpro runs one task per node",
    "ntasks-per-node": "pixpro runs one task per node",
    "gpus-per-node": "set from resources.gpus_per_node",
    "gpus": "set from resources.gpus_per_node",
    "signal": "set from resources.signal and resources.signal_lead_s",
    "requeue": "always set by pixpro",
    "no-requeue": "pixpro relies on requeue",
    "time": "set from resources.time_limit_min",
    "output": "pixpro writes logs beside the run",
    "error": "pixpro writes logs beside the run",
    "job-name": "set from name",
    "partition": "use resources.partition",
    "account": "use resources.account",
    "qos": "use resources.qos",
    "constraint": "use resources.constraint",
    "cpus-per-task": "use resources.cpus_per_task",
    "mem": "use resources.mem_gb",
}
"""sbatch long options pixpro writes itself; ``resources.extra_sbatch`` may not set them (a second,
conflicting value would silently win or break requeue/signal handling)."""

MAX_NESTING = 16  # levels of objects and arrays in storage options
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"  # never an option (-x) or a hidden/dot folder
SLURM_WORD_PATTERN = r"^[!-~]+$"  # printable ASCII without spaces (the same in every regex engine)
SBATCH_KEY_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
SBATCH_VALUE_PATTERN = r"^[^\x00-\x1f\x7f]*$"

CREDENTIALS_RULE = "credentials come from the environment or a named profile, never the spec"
CREDENTIALS_HINT = f"looks like a credential; {CREDENTIALS_RULE}"

ANNOTATION_KEYS = frozenset({"$schema", "$comment"})
"""Top-level keys that annotate a spec file (an editor's ``$schema``, an author's ``$comment``); they are
not part of the run."""
