"""``import_dataset_readers``: TFDS imported up front for the datasets read through it, before any
thread starts (its import is not safe beside another thread's)."""

from tests.python_process import run_python
from tests.test_extras import run_without


def test_tfds_is_imported_for_a_tfds_dataset_only():
    out = run_python(
        "import sys\n"
        "from kdjax.data import import_dataset_readers\n"
        "import_dataset_readers('synthetic')\n"
        "print('tensorflow_datasets' in sys.modules)\n"
        "import_dataset_readers('camvid')\n"
        "print('tensorflow_datasets' in sys.modules)\n")
    assert out.split() == ["False", "True"]


def test_without_the_data_extra_a_tfds_dataset_names_the_extra():
    code = ("from kdjax.data import import_dataset_readers\n"
            "import_dataset_readers('synthetic')\n"
            "import_dataset_readers('camvid')\n")
    proc = run_without(["tensorflow_datasets"], code)
    assert proc.returncode == 1
    assert ("ModuleNotFoundError: data.name='camvid' needs kdjax's 'data' extra "
            "(tensorflow_datasets is not installed): pip install 'kdjax[data]'") in proc.stderr
