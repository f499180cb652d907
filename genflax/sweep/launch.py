"""Where a sweep's workers run: processes on this machine, or a SLURM job array.

Either way each worker is `worker.work` over the same sweep workdir, so
workers started by different commands, machines or array tasks join the
same study; a worker that dies leaves its trial to the others.
"""
import inspect
import os
import shlex
import signal
import subprocess
import sys

from genflax.errors import ConfigError, UserError
from genflax.sweep import worker

CLUSTERS = ("slurm", "local", "debug")


def local(workdir: str, workers: int) -> None:
  """Runs `workers` worker processes here, each on its share of the machine, and waits."""
  procs = [subprocess.Popen(
      [sys.executable, "-m", "genflax.sweep", "worker", workdir, f"--index={i}", f"--of={workers}"],
      preexec_fn=worker.child_setup) for i in range(workers)]

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = [p.wait() for p in procs]
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  if any(c == 2 for c in codes):
    raise UserError("a worker stopped the sweep (its error is above)")


def slurm(workdir: str, workers: int, params: dict, cluster: str = "slurm",
          dry_run: bool = False) -> None:
  """Submits the workers as one SLURM job array through submitit.

  params are sbatch's (partition, time in minutes, gpus_per_node,
  cpus_per_task, mem, account, qos, constraint, setup, ...: the arguments
  of submitit's sbatch writer). cluster="local" runs the same array on
  this machine through submitit's local executor and waits for it.
  """
  import submitit  # pylint: disable=g-import-not-at-top
  from submitit.slurm import slurm as submitit_slurm  # pylint: disable=g-import-not-at-top
  if cluster not in CLUSTERS:
    raise ConfigError(f"--slurm_cluster={cluster}: expected one of {CLUSTERS}")
  allowed = set(inspect.signature(submitit_slurm._make_sbatch_string).parameters) - {  # pylint: disable=protected-access
      "command", "folder", "map_count"}
  unknown = sorted(set(params) - allowed)
  if unknown:
    raise ConfigError(f"--slurm {unknown[0]}=...: not an sbatch setting submitit knows; "
                      f"expected one of {sorted(allowed)}")
  folder = os.path.join(workdir, "slurm")
  params = {"job_name": f"sweep-{os.path.basename(workdir)}", "array_parallelism": workers,
            **params}
  if dry_run:
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}"
    print(submitit_slurm._make_sbatch_string(  # pylint: disable=protected-access
        command=command, folder=folder, map_count=workers, **params))
    print(f"# each of the {workers} array tasks runs genflax.sweep.worker.work({workdir!r}, "
          f"index=<task>, of={workers}) on its own allocation")
    return
  if cluster == "slurm":
    try:
      executor = submitit.SlurmExecutor(folder)
    except RuntimeError as e:
      raise UserError(f"--launcher slurm: {e} (--dry_run prints the job without submitting "
                      "it; --slurm_cluster local runs it here)") from None
    executor.update_parameters(**params)
  else:
    executor = submitit.AutoExecutor(folder, cluster=cluster)
    executor.update_parameters(timeout_min=int(params.get("time", 60 * 24)))
  split = cluster != "slurm"  # on one machine the workers share it; on SLURM each has its own
  jobs = executor.map_array(worker.work, [workdir] * workers, list(range(workers)),
                            [workers] * workers, [split] * workers)
  print(f"submitted {workers} workers: job {jobs[0].job_id.split('_')[0]} "
        f"(logs in {folder}); follow with python -m genflax.sweep report {workdir}")
  if cluster != "slurm":
    for job in jobs:
      job.result()
