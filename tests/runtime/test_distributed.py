"""Multi-process start-up: which launches call ``jax.distributed.initialize`` and with what, and the
error when it fails. ``initialize`` is replaced by a recorder: this process stays alone."""

import jax
import pytest

from kdjax.runtime import distributed

SLURM_STEP = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]",
              "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
# What an `salloc` shell holds: the job, no step.
SALLOC = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu07",
          "SLURM_NODELIST": "gpu07"}


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    # The log line after a successful start reads the devices of this (single) process.
    return calls


@pytest.mark.parametrize("environ, kind", [
    ({}, "single"),
    (SALLOC, "single"),
    ({**SALLOC, "SLURM_NTASKS": "1"}, "single"),
    (SLURM_STEP, "slurm"),
    ({**SLURM_STEP, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, "slurm"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_LOCALID"}, "single"),
    ({"JAX_PLATFORMS": "tpu"}, "tpu"),
    ({"JAX_PLATFORMS": "tpu,cpu", "TPU_WORKER_HOSTNAMES": "w0,w1"}, "tpu"),
    ({"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "w0,w1"}, "single"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "environment"),
])
def test_detect_launch(environ, kind):
    assert distributed.detect_launch(environ=environ).kind == kind


def test_a_config_coordinator_wins_over_the_environment():
    launch = distributed.detect_launch("10.0.0.1:8476", 2, 1, environ=SLURM_STEP)
    assert launch.kind == "config" and launch.coordinator == "10.0.0.1:8476"
    assert launch.arguments == {"coordinator_address": "10.0.0.1:8476", "num_processes": 2,
                                "process_id": 1}


def test_environment_coordinator_with_process_count_and_id():
    launch = distributed.detect_launch(environ={"JAX_COORDINATOR_ADDRESS": "head:9000",
                                                "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"})
    assert launch.arguments == {"coordinator_address": "head:9000", "num_processes": 4,
                                "process_id": 3}


@pytest.mark.parametrize("nodes, host", [("localhost", "localhost"), ("gpu[07-08]", "gpu07"),
                                         ("gpu[3,5-9],cpu1", "gpu3"), ("a1,a2", "a1")])
def test_slurm_coordinator_is_the_one_jax_chooses(nodes, host):
    environ = {**SLURM_STEP, "SLURM_STEP_NODELIST": nodes}
    assert distributed.slurm_coordinator(environ) == f"{host}:{123456 % 4096 + 61440}"
    from jax._src.clusters import slurm_cluster  # JAX's own rule, where this jax has it

    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ.items():
            patch.setenv(name, value)
        assert slurm_cluster.SlurmCluster.get_coordinator_address(None, None) == \
            distributed.slurm_coordinator(environ)


@pytest.mark.parametrize("environ, arguments", [
    (SLURM_STEP, {}),
    ({"JAX_PLATFORMS": "tpu"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}),
])
def test_initialize_is_called_for_multi_process_launches(recorded, environ, arguments):
    assert distributed.initialize_distributed(environ=environ) is True
    assert recorded == [{**arguments, "initialization_timeout": distributed.JOIN_TIMEOUT}]


@pytest.mark.parametrize("environ", [{}, SALLOC])
def test_a_plain_process_and_an_salloc_shell_run_alone(recorded, environ):
    assert distributed.initialize_distributed(environ=environ) is False
    assert recorded == []


def test_already_initialized(recorded, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.initialize_distributed("127.0.0.1:1234", 2, 0) is True
    assert recorded == []


def test_a_failing_start_names_the_launch_and_the_coordinator(monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out\nlong C++ trace")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(distributed.DistributedStartError) as error:
        distributed.initialize_distributed(environ=SLURM_STEP)
    message = str(error.value)
    assert "Slurm job 123456, step 0: task 9 of 16 on gpu[07-08]" in message
    assert f"gpu07:{123456 % 4096 + 61440}" in message
    assert "DEADLINE_EXCEEDED: Barrier timed out" in message and "C++ trace" not in message
    assert "srun --ntasks" in message
