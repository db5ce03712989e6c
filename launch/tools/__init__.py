"""After-training tools, run on a login or GPU node once checkpoints exist: export weights, the dense
probe, figures. Separate from the compute-node runtime in :mod:`launch`; ``pixpro export/eval/viz/plot``
start them as ``python -m launch.tools.<name>``."""
