# Sourced by the sbatch scripts. `run_requeueable CMD...` runs CMD (an mpirun line) in the background and:
#  - passes SIGUSR1 or SIGTERM that reach this batch shell on to it as SIGUSR1 (sbatch --signal=B:USR1@300 sends
#    one some minutes before the time limit). mpirun forwards SIGUSR1 to every rank; SIGTERM it does not forward
#    (it ends the ranks itself within about a second, too soon for a checkpoint);
#  - requeues the job when the ranks stopped on that signal (exit status 75: a checkpoint at the step they
#    reached is written, and the requeued job's `--resume auto` continues from it); any other status is returned.
run_requeueable() {
  "$@" &
  local pid=$! rc forwarded
  trap 'forwarded=1; kill -USR1 "$pid" 2>/dev/null' USR1 TERM
  while :; do                            # wait returns early when a trapped signal arrives: wait again then
    forwarded=0 rc=0
    wait "$pid" || rc=$?
    [ "$forwarded" = 1 ] || break
  done
  trap - USR1 TERM
  if [ "$rc" -eq 75 ]; then
    echo "stopped by a signal at a checkpoint: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}
