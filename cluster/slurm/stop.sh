#!/usr/bin/env bash
# Stop the local SLURM cluster started by cluster/slurm/setup.sh: slurmd (node1, node2), slurmctld,
# slurmdbd, mariadbd, munged -- each by its pid file under $PIXPRO_SLURM_DIR (default
# /var/lib/pixpro-slurm). Idempotent: whatever is not running is skipped. Files stay in that folder.
#
#   cluster/slurm/stop.sh                 # stop the daemons (job state is kept, jobs resume later)
#   cluster/slurm/stop.sh --cancel-jobs   # scancel every job first (no job processes left behind)
#
# Running job steps (slurmstepd) outlive slurmd by design; use --cancel-jobs to end them.
set -uo pipefail

DIR=${PIXPRO_SLURM_DIR:-/var/lib/pixpro-slurm}
RUN_DIR=$DIR/run
CONF=$DIR/etc/slurm.conf
CANCEL=0
for a in "$@"; do
    case "$a" in
        --cancel-jobs) CANCEL=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--cancel-jobs]" >&2; exit 2 ;;
    esac
done
export SLURM_CONF=$CONF

pid_of() {  # pid_of PIDFILE COMM -> pid if that process is alive and has that name
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

stop() {  # stop NAME PIDFILE COMM [WAIT_S]
    local pid i
    if ! pid=$(pid_of "$2" "$3"); then
        echo "[pixpro-slurm] $1 not running"
        rm -f "$2"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < ${4:-10} * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "[pixpro-slurm] $1 (pid $pid) ignored SIGTERM for ${4:-10} s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$2"
    echo "[pixpro-slurm] stopped $1 (pid $pid)"
}

if [[ $CANCEL -eq 1 ]] && pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null && [[ -f $CONF ]]; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        echo "[pixpro-slurm] cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel --quiet $jobs 2>/dev/null || true
    fi
    for ((i = 0; i < 100; i++)); do
        [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
        sleep 0.1
    done
fi

# Each daemon takes ~2 s to go: stop those that do not depend on each other together. slurmctld
# sends its last records to slurmdbd, which writes them to mariadbd; all of them need munged.
stop "slurmd node1" "$RUN_DIR/slurmd-node1.pid" slurmd &
stop "slurmd node2" "$RUN_DIR/slurmd-node2.pid" slurmd &
stop slurmctld "$RUN_DIR/slurmctld.pid" slurmctld &
wait
stop slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
stop mariadbd "$DIR/db/mysqld.pid" mariadbd 60 &
stop munged "$DIR/munge/munged.pid" munged &
wait
exit 0
