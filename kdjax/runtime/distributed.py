"""Multi-process start-up: which launcher started this process, and ``jax.distributed.initialize``.

``initialize()`` joins the processes of a run before any device is touched, and starts what a
multi-process run relies on: JAX's preemption service (a SIGTERM on any process becomes a stop at
one step that every process reaches, :mod:`kdjax.runtime.preemption`), the coordination service's
barriers and key-value store (:mod:`kdjax.runtime.coordination`, Orbax's checkpoints) and health
checking. kdjax calls it when:

- the config names a coordinator (``distributed.coordinator_address``, ``num_processes``,
  ``process_id``), or the environment does (``JAX_COORDINATOR_ADDRESS``, with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` where no cluster gives them, e.g. a Kubernetes
  indexed Job);
- this process is a task of a Slurm job step: JAX's own detection needs ``SLURM_JOB_ID``,
  ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID`` and ``SLURM_LOCALID``, and takes the
  first host of the step's node list on port ``SLURM_JOB_ID % 4096 + 61440`` as the coordinator.
  An ``salloc`` shell has the job's variables but no step: a command run there is one process;
- the platform is TPU (``JAX_PLATFORMS=tpu``, or TPU chips with libtpu installed), on one host
  too: JAX finds the other workers of a TPU VM slice from the VM's metadata, or from
  ``TPU_WORKER_HOSTNAMES`` on GKE. libtpu joins the hosts without it, but then no preemption
  service runs and a preempted slice would stop without a checkpoint.

A plain process, or any other, runs alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

from kdjax.runtime.platform import expected_platform

log = logging.getLogger(__name__)

SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                        "SLURM_LOCALID")
# Seconds a process waits for the others to join. A slice's workers or a job step's tasks start
# within seconds of each other, but each imports TensorFlow and JAX first, which on a loaded host
# takes minutes.
JOIN_TIMEOUT = 900


class DistributedStartError(RuntimeError):
    """``jax.distributed.initialize`` failed; the message names the launch that was detected."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started, as far as multi-process start-up is concerned.

    Attributes:
      kind: 'config', 'environment', 'slurm', 'tpu' (``initialize`` is called), or 'single'.
      description: the launch in words, for logs and errors.
      arguments: what ``jax.distributed.initialize`` is given; the rest JAX detects itself.
      coordinator: the coordinator's address where it is known before ``initialize``.
    """

    kind: str
    description: str
    arguments: Mapping[str, object] = dataclasses.field(default_factory=dict)
    coordinator: str | None = None

    @property
    def multi_process(self) -> bool:
        return self.kind != "single"


def slurm_coordinator(environ: Mapping[str, str]) -> str:
    """The address JAX's Slurm detection chooses: the first host of ``SLURM_STEP_NODELIST``
    (``node[3-5,9],gpu2`` → ``node3``) on port ``SLURM_JOB_ID % 4096 + 61440``."""
    nodes = environ["SLURM_STEP_NODELIST"]
    head, bracket, rest = nodes.split(",")[0].partition("[")
    if bracket:  # the first bracketed range of the first entry: its first number
        head += nodes.partition("[")[2].split(",")[0].split("-")[0].rstrip("]")
    return f"{head}:{int(environ['SLURM_JOB_ID']) % 4096 + 61440}"


def detect_launch(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None,
                  environ: Mapping[str, str] = os.environ) -> Launch:
    """The launch of this process, from the config's ``distributed`` fields and ``environ``."""
    if coordinator_address:
        return Launch("config", f"the config's coordinator {coordinator_address} "
                      f"(process {process_id} of {num_processes})",
                      dict(coordinator_address=coordinator_address, num_processes=num_processes,
                           process_id=process_id), coordinator_address)
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        address = environ["JAX_COORDINATOR_ADDRESS"]
        arguments = {"coordinator_address": address}
        for name, variable in (("num_processes", "JAX_NUM_PROCESSES"),
                               ("process_id", "JAX_PROCESS_ID")):
            if environ.get(variable):
                arguments[name] = int(environ[variable])
        return Launch("environment", f"JAX_COORDINATOR_ADDRESS={address}", arguments, address)
    if all(environ.get(name) for name in SLURM_STEP_VARIABLES):
        return Launch("slurm", f"Slurm job {environ['SLURM_JOB_ID']}, step "
                      f"{environ.get('SLURM_STEP_ID', '?')}: task {environ['SLURM_PROCID']} of "
                      f"{environ['SLURM_NTASKS']} on {environ['SLURM_STEP_NODELIST']}",
                      {}, slurm_coordinator(environ))
    if expected_platform(environ) == "tpu":
        workers = environ.get("TPU_WORKER_HOSTNAMES")
        where = (f"TPU_WORKER_HOSTNAMES={workers}" if workers
                 else "the TPU VM's metadata names the workers")
        return Launch("tpu", f"TPU ({where})")
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return Launch("single", f"a Slurm allocation of {environ['SLURM_NTASKS']} tasks without "
                      "a job step (salloc): one process; start the tasks with srun")
    return Launch("single", "one process")


def _advice(launch: Launch) -> str:
    if launch.kind == "slurm":
        return ("Check that every task of the step started (srun --ntasks), that the first node "
                f"accepts connections on {launch.coordinator}, and that no other job step of this "
                "job uses that port.")
    if launch.kind == "tpu":
        return ("Run the same command on every worker of the slice at once (launch/tpu_pod.sh "
                "run), and check that no other process holds the TPU.")
    return (f"Check that every process was started with the same coordinator "
            f"({launch.coordinator}), a distinct process id and the same number of processes, and "
            "that process 0's host accepts connections on that port.")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           environ: Mapping[str, str] = os.environ) -> bool:
    """Calls ``jax.distributed.initialize`` when the launch asks for it; returns whether the
    process runs under it. Call it before anything touches a device.

    Raises:
      DistributedStartError: ``initialize`` failed; the message names the detected launch, the
        coordinator and what to check.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    launch = detect_launch(coordinator_address, num_processes, process_id, environ)
    if not launch.multi_process:
        if launch.description != "one process":
            log.info("%s", launch.description)
        return False
    log.info("multi-process start-up: %s", launch.description)
    try:
        jax.distributed.initialize(**launch.arguments, initialization_timeout=JOIN_TIMEOUT)
    except Exception as error:  # JAX raises ValueError, RuntimeError and XlaRuntimeError here
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistributedStartError(
            f"jax.distributed.initialize failed for {launch.description} (coordinator "
            f"{launch.coordinator or 'found by JAX'}): {detail}. {_advice(launch)}") from error
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
