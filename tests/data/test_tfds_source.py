"""The pipeline on a TFDS builder: CamVid prepared from its fake data on first use."""

from pathlib import Path

import numpy as np
import pytest

from kdjax.config.data_defaults import default_data_config
from kdjax.data import DataError, make_eval_iterator, make_train_iterator

FAKE_CAMVID = Path(__file__).parents[2] / "datasets" / "camvid" / "dummy_data"
pytestmark = pytest.mark.skipif(not FAKE_CAMVID.is_dir(), reason="the CamVid builder's fake data is absent")


@pytest.fixture(scope="module")
def camvid_config(tmp_path_factory):
    config = default_data_config()
    config.name = "camvid"
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.manual_dir = str(FAKE_CAMVID)
    config.crop_size = (24, 32)
    config.num_parallel_calls = 2
    return config


def test_an_unprepared_dataset_without_manual_dir_says_what_to_do(tmp_path):
    config = default_data_config()
    config.update(name="camvid", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="not prepared .* data.manual_dir"):
        make_train_iterator(config, global_batch_size=1, seed=0, process_index=0, process_count=1)


def test_training_and_evaluation_read_the_prepared_builder(camvid_config):
    batch = next(make_train_iterator(camvid_config, global_batch_size=2, seed=0, process_index=0,
                                     process_count=1))
    assert batch["image"].shape == (2, 24, 32, 3) and batch["label"].shape == (2, 24, 32)
    evaluation = list(make_eval_iterator(camvid_config, global_batch_size=2, process_index=0, process_count=1))
    assert sum(int(b["valid"].sum()) for b in evaluation) == 2  # the fake validation split
    labels = np.concatenate([b["label"][b["valid"]].ravel() for b in evaluation])
    assert set(np.unique(labels)) <= set(range(11)) | {255}  # stored void 11 became ignore
    assert 255 in labels
