"""The run spec, one module per job: :mod:`~schemas.spec.constants` (limits and tables),
:mod:`~schemas.spec.fields` (the strict base model and shared field types), the section models
(:mod:`~schemas.spec.data`, :mod:`~schemas.spec.training`, :mod:`~schemas.spec.operations`,
:mod:`~schemas.spec.run`), :mod:`~schemas.spec.rules` (cross-field rules), :mod:`~schemas.spec.hashing`,
:mod:`~schemas.spec.export` (the JSON Schema), :mod:`~schemas.spec.errors` (one-line errors),
:mod:`~schemas.spec.parse` (validation and ``--set`` overrides) and :mod:`~schemas.spec.load` (files).

Imports run one way, in that order. Callers import the public names from :mod:`schemas`."""
