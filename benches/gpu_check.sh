#!/usr/bin/env bash
# The GPU acceptance check as a lent GPU machine runs it (`make gpu-check OUT=dir` calls this).
#
#   bash benches/gpu_check.sh OUT [gpu_check.py options]
#
# A lent machine reaches no package index and has no .venv (6 GB; a call carries 64 MiB): its image's
# python3 holds torch (2.11 there; pixpro/torch_compat.py) but not pydantic or setproctitle. Their
# wheels are fetched here beforehand (`make gpu-wheels`, into .whl/) and carried; this installs them
# into a folder of its own. The full record stays in WORK (default /tmp/pixpro-gpu-check; `--only`
# reruns merge into it while the machine is warm). OUT gets three files, what a lent machine hands back
# (at most 8 files, 2 folders down): gpu_check.json, gpu_check.md and gpu_check-files.tar.gz (every
# log and result, no checkpoint payload). Exit status: gpu_check.py's.
set -uo pipefail
out=${1:?usage: benches/gpu_check.sh OUT [gpu_check.py options]}
shift
cd "$(dirname "$0")/.." || exit 2
work=${PIXPRO_GPU_CHECK_WORK:-/tmp/pixpro-gpu-check}
py=${PIXPRO_GPU_CHECK_PYTHON:-}
if [ -z "$py" ] && [ -x .venv/bin/python ]; then
    py=.venv/bin/python
elif [ -z "$py" ]; then
    py=python3
fi
# the carried wheels, where this python lacks what they hold (never over a venv's own packages)
if compgen -G ".whl/*.whl" >/dev/null && ! "$py" -c "import pydantic, setproctitle" 2>/dev/null; then
    site=${PIXPRO_GPU_CHECK_SITE:-/tmp/pixpro-gpu-check-site}
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl || { echo "gpu_check.sh: the carried wheels in .whl/ did not install" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$out" "$work" || exit 2
PYTHONUNBUFFERED=1 "$py" benches/gpu_check.py "$work" "$@"
rc=$?
for f in gpu_check.json gpu_check.md; do
    [ ! -f "$work/$f" ] || cp "$work/$f" "$out/$f"
done
tar -czf "$out/gpu_check-files.tar.gz" -C "$work" --exclude='checkpoints' . ||
    echo "gpu_check.sh: could not pack $work into $out" >&2
exit $rc
