"""The checks of ``benches/gpu_check.py``, one job per module.

- ``plan``: which checks exist, their budgets (which must fit the run's total) and sizes; torch-free.
- ``record``: the record and the table (parent), a check's own record (child); torch-free.
- ``runner``: runs each check in a child process under its budget; kills the whole process tree past it.
- ``child``: the child's entry point (``python -m gpu_checks.child``).
- ``common``: what the checks share: the context, the deadline, specs, trainers, timing, state diffs.
- ``syncs``: host syncs of a step, counted with CUDA's sync debug mode or ``HostSyncCounter``.
- the checks, by topic: ``env``, ``syncbn``, ``steps``, ``perf`` (throughput, compile), ``data``
  (input pipeline, photometric), ``state`` (checkpoint), ``job`` (the real job under ``launch.run``).
- ``observe/sitecustomize.py``: counts the job's ``torch.distributed`` calls per group (a pass-through).

Nothing here imports ``benches/gpu_check.py``: the CLI imports the package, never the other way round.
"""
