# shellcheck shell=bash
# Shared set-up of the sbatch templates in this folder; sourced by them, not run.
#
# A template finds the repository (SLURM runs a copy of the script from its spool
# folder, so not from the script's own path) and sources this file:
#
#   ROOT=${STEPAGENT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}   # submit from the repo root
#   source "$ROOT/slurm/common.sh"
#
# It then: changes to the repository; sources the site file (${STEPAGENT_SITE:-slurm/site.sh},
# git-ignored, see site.example.sh: modules, conda env, cache paths) if it exists; and
# defines `sa_run CMD...`, which runs CMD, passes SIGUSR1 (sent by `--signal=B:USR1@120`
# shortly before the time limit) on to it so the run stops at a safe point and exits, and then
# requeues the job; the requeued job resumes with `resume=auto`.
#
# Variables read (all optional):
#   STEPAGENT_ROOT      the repository (default: the folder sbatch was called from)
#   STEPAGENT_SITE      the site file to source (default: $ROOT/slurm/site.sh)
#   PYTHON              the interpreter (default: python, after the site file ran)
#   STEPAGENT_NPROC     processes per node (default: $SLURM_GPUS_ON_NODE, else 1)
#   STEPAGENT_REQUEUE   0: do not requeue after the signal (default 1)

ROOT=${ROOT:-${STEPAGENT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}}
if [ ! -f "$ROOT/run.py" ]; then
    echo "stepagent: no run.py in $ROOT: submit from the repository root or set STEPAGENT_ROOT" >&2
    exit 2
fi
cd "$ROOT" || exit 2
export STEPAGENT_ROOT=$ROOT

STEPAGENT_SITE=${STEPAGENT_SITE:-$ROOT/slurm/site.sh}
if [ -f "$STEPAGENT_SITE" ]; then
    # shellcheck source=/dev/null
    source "$STEPAGENT_SITE"
fi

PYTHON=${PYTHON:-python}
# shellcheck disable=SC2034  # read by the templates that source this file
NPROC=${STEPAGENT_NPROC:-${SLURM_GPUS_ON_NODE:-1}}
# torchrun passes these signals on to its ranks (by default it has no handler for SIGUSR1,
# which would kill it) and gives them this long to checkpoint before SIGKILL
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
# Progress bars in a log file: redraw rarely
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}

sa_signalled=""
sa_child=""

sa_on_usr1() {
    sa_signalled=1
    echo "stepagent: $(date '+%F %T') SIGUSR1 (time limit near or preemption): passing it on to pid $sa_child" >&2
    if [ -n "$sa_child" ]; then
        kill -USR1 "$sa_child" 2>/dev/null || true
    fi
}

# sa_stable_run_dir OVERRIDES...: set SA_RUN_DIR to a run-directory override that a requeued
# job finds again (the default outputs/<date>/<time>_... differs at every start, and between
# nodes), unless OVERRIDES set hydra.run.dir or an experiment (whose config sets it).
SA_RUN_DIR=()
# shellcheck disable=SC2016,SC2034  # Hydra interpolations, not shell; SA_RUN_DIR is read by the templates
sa_stable_run_dir() {
    local arg
    for arg in "$@"; do
        case $arg in
            hydra.run.dir=* | experiment=*) SA_RUN_DIR=(); return 0 ;;
        esac
    done
    SA_RUN_DIR=("hydra.run.dir=outputs/slurm/${SLURM_JOB_ID:-nojob}"'_${task.name}_${reward.name}_s${seed}')
}

# sa_run CMD...: run CMD in the background (a trap runs only between commands, so a
# foreground command would delay the signal until it ended), wait for it, requeue the job
# if SIGUSR1 came; return CMD's exit status.
sa_run() {
    local rc
    echo "stepagent: job ${SLURM_JOB_ID:-none} on ${SLURM_JOB_NODELIST:-$(hostname)}," \
        "restart ${SLURM_RESTART_COUNT:-0}, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" >&2
    echo "stepagent: $*" >&2
    trap sa_on_usr1 USR1
    "$@" &
    sa_child=$!
    wait "$sa_child"
    rc=$?
    # wait returns early (status > 128) when the trap ran; wait again until the run has exited
    while kill -0 "$sa_child" 2>/dev/null; do
        wait "$sa_child"
        rc=$?
    done
    trap - USR1
    echo "stepagent: $(date '+%F %T') exit status $rc" >&2
    if [ -n "$sa_signalled" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${STEPAGENT_REQUEUE:-1}" = 1 ]; then
        echo "stepagent: requeueing job $SLURM_JOB_ID (it resumes with resume=auto)" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
