"""``kdjax data show``: the grid of augmented samples."""

import matplotlib.image
import ml_collections
import numpy as np

from kdjax.config.data_defaults import default_data_config
from kdjax.data.show import colour_labels, show_command


def test_labels_are_coloured_by_the_palette_with_ignore_black():
    palette = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    coloured = colour_labels(np.array([[0, 1, 255]]), palette, 255)
    np.testing.assert_array_equal(coloured, [[[10, 20, 30], [40, 50, 60], [0, 0, 0]]])


def test_show_command_writes_a_png_grid(tmp_path):
    config = ml_collections.ConfigDict({"seed": 2, "data": default_data_config()})
    config.data.synthetic.update(num_train=4, height=24, width=48)
    config.data.crop_size = (24, 24)
    out = tmp_path / "grid.png"
    show_command(config, out)
    picture = matplotlib.image.imread(out)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    assert picture[..., :3].std() > 0.05  # not a blank canvas
