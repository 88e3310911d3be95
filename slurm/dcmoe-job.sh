# dcmoe-job.sh: shell functions shared by slurm/run.sbatch and slurm/sweep-array.sbatch (sourced,
# not run). They decide what a run folder needs (skip / resume / start), launch the trainer in the
# background under mpirun or srun, and turn the pre-timeout signal into checkpoint + requeue:
#   Slurm --signal=B:USR1@<s>  ->  this shell  ->  USR1 to the launcher (mpirun and srun forward it
#   to every rank)  ->  dcmoe checkpoints at the end of the step and exits 0  ->  scontrol requeue.
# A requeued job runs the same script again and resumes from the newest complete checkpoint.
# Does not: submit jobs (dcmoe sweep run --launcher slurm does) or build anything.
#
# Settings (environment; sbatch --export=ALL passes them through):
#   DCMOE_ROOT        source tree (slurm/, analysis/); default $SLURM_SUBMIT_DIR
#   DCMOE_EXE         the dcmoe executable; default $DCMOE_ROOT/build/dcmoe
#   DCMOE_MPI_LAUNCH  auto (default), mpirun or srun. auto: inside a Slurm job whose cluster sets an
#                     MpiDefault other than none (e.g. pmix on a real cluster) -> srun; otherwise
#                     (MpiDefault=none, as on this machine, or outside Slurm) -> mpirun
#   DCMOE_SRUN_MPI    MPI plugin for srun; default: the cluster's MpiDefault (pmix if unknown)
#   DCMOE_MPIRUN_ARGS extra mpirun arguments

: "${DCMOE_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${DCMOE_EXE:=$DCMOE_ROOT/build/dcmoe}"
: "${DCMOE_MPI_LAUNCH:=auto}"
: "${DCMOE_SRUN_MPI:=}"
: "${DCMOE_MPIRUN_ARGS:=}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

dcmoe_log() { echo "[dcmoe-job $(date +%H:%M:%S) job ${SLURM_JOB_ID:-none}] $*"; }

# state of a run folder: done (DONE marker), resumable (a complete checkpoint), partial
# (metrics.h5 but no complete checkpoint), new. The same rule as launcher_run_state in src/launcher.c.
dcmoe_run_state() {
    local d="$1"
    if [ -f "$d/DONE" ]; then echo done; return; fi
    if compgen -G "$d/ckpt/step_*/COMPLETE" > /dev/null; then echo resumable; return; fi
    if [ -e "$d/metrics.h5" ]; then echo partial; return; fi
    echo new
}

_dcmoe_child=""
_dcmoe_signal=""
_dcmoe_on_signal() {
    _dcmoe_signal="$1"
    if [ -z "$_dcmoe_child" ]; then
        dcmoe_log "received SIG$1 while no trainer runs: no new run starts in this job"
        return
    fi
    dcmoe_log "received SIG$1: asking the trainer (pid $_dcmoe_child) to checkpoint and stop"
    # SIGUSR1 is dcmoe's "checkpoint at the end of this step and exit"; also on TERM (scancel,
    # scontrol requeue), so the checkpoint is written before Slurm's KillWait ends
    kill -USR1 "$_dcmoe_child" 2> /dev/null
}
# the traps are set when this file is sourced, so a signal that arrives while the job script is
# still setting up (resolving the run folder, asking scontrol) is remembered instead of killing
# the shell (bash's default for USR1), and the job requeues instead of failing
trap '_dcmoe_on_signal USR1' USR1
trap '_dcmoe_on_signal TERM' TERM

# dcmoe_requeue_if_signalled: after a USR1, requeue this job (inside Slurm) and return 0; else 1
dcmoe_requeue_if_signalled() {
    if [ "$_dcmoe_signal" = USR1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        dcmoe_log "requeueing job $SLURM_JOB_ID (it resumes from the newest complete checkpoint)"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return 1
}

# dcmoe_train CONFIG RANKS RUN_DIR [train options...]: run (or resume, or skip) one run.
# Returns the trainer's exit code; after a USR1 it requeues the job (when inside Slurm) and returns 0.
dcmoe_train() {
    local config="$1" ranks="$2" run_dir="$3"
    shift 3
    local state resume=()
    state=$(dcmoe_run_state "$run_dir")
    dcmoe_log "run folder $run_dir: $state"
    case "$state" in
        done) dcmoe_log "already complete (DONE); nothing to do"; return 0 ;;
        resumable) resume=(--resume) ;;
        partial)
            local k=1
            while [ -e "$run_dir.partial-$k" ]; do k=$((k + 1)); done
            mv "$run_dir" "$run_dir.partial-$k"
            dcmoe_log "killed before its first checkpoint: moved to $run_dir.partial-$k, starting again" ;;
    esac
    local launch=() how="$DCMOE_MPI_LAUNCH" mpi_default=""
    if [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol > /dev/null; then
        mpi_default=$(scontrol show config 2> /dev/null | awk '$1 == "MpiDefault" { print $3 }')
    fi
    if [ "$how" = auto ]; then
        if [ -n "$mpi_default" ] && [ "$mpi_default" != none ]; then how=srun; else how=mpirun; fi
        dcmoe_log "MPI launch: $how (DCMOE_MPI_LAUNCH=auto, MpiDefault=${mpi_default:-outside Slurm})"
    fi
    if [ "$how" = srun ]; then
        local plugin="${DCMOE_SRUN_MPI:-${mpi_default:-pmix}}"
        [ "$plugin" = none ] && plugin=pmix
        launch=(srun --mpi="$plugin" -n "$ranks")
    else
        launch=(mpirun -n "$ranks")
        [ "$(id -u)" = 0 ] && launch+=(--allow-run-as-root)
        [ "$ranks" -gt "$(nproc)" ] && launch+=(--oversubscribe)
        # shellcheck disable=SC2206
        launch+=($DCMOE_MPIRUN_ARGS)
    fi
    # a sweep array allocates the largest rank count of the sweep; a run that uses fewer ranks
    # says so, because dcmoe checks MPI_Comm_size against SLURM_NTASKS
    if [ -n "${SLURM_NTASKS:-}" ] && [ "$SLURM_NTASKS" != "$ranks" ]; then
        dcmoe_log "this run uses $ranks of the allocation's $SLURM_NTASKS tasks"
        export SLURM_NTASKS="$ranks"
    fi
    if [ -n "$_dcmoe_signal" ]; then
        dcmoe_log "SIG$_dcmoe_signal arrived before the trainer started: not starting it"
        dcmoe_requeue_if_signalled && return 0
        return 1
    fi
    dcmoe_log "${launch[*]} $DCMOE_EXE train $config ${resume[*]} $*"
    "${launch[@]}" "$DCMOE_EXE" train "$config" "${resume[@]}" "$@" &
    _dcmoe_child=$!
    local rc=0
    while :; do
        wait "$_dcmoe_child"
        rc=$?
        kill -0 "$_dcmoe_child" 2> /dev/null || break   # wait returned because of a trapped signal
    done
    _dcmoe_child=""
    state=$(dcmoe_run_state "$run_dir")
    dcmoe_log "trainer exited with $rc; run folder: $state"
    if [ "$state" != done ] && dcmoe_requeue_if_signalled; then
        return 0
    fi
    return "$rc"
}
