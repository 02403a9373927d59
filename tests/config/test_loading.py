"""Config files, the :local switch and --config.key=value overrides."""

import textwrap

import ml_collections
import pytest

from kdjax.config.loading import ConfigError, apply_overrides, check_known_keys, load_config


def _config():
    config = ml_collections.ConfigDict()
    config.train = ml_collections.ConfigDict(dict(steps=10, learning_rate=0.1, batch_size=8))
    config.data = ml_collections.ConfigDict(dict(name="synthetic", crop_size=(64, 64)))
    config.teacher = ml_collections.ConfigDict(dict(checkpoint=None))
    return config


def test_overrides_parse_literals_and_keep_types():
    config = apply_overrides(_config(), ["train.steps=20", "train.learning_rate=1",
                                         "data.crop_size=[32,48]", "data.name=camvid",
                                         "teacher.checkpoint=/tmp/teacher dir"])
    assert config.train.steps == 20
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.data.crop_size == (32, 48)
    assert config.data.name == "camvid"
    assert config.teacher.checkpoint == "/tmp/teacher dir"


def test_unknown_override_key_names_near_matches():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stepz'.*train\.steps"):
        apply_overrides(_config(), ["train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown config key 'nope.steps'"):
        apply_overrides(_config(), ["nope.steps=3"])


def test_override_of_a_group_or_malformed_item_is_refused():
    with pytest.raises(ConfigError, match="group of settings"):
        apply_overrides(_config(), ["train=3"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(_config(), ["train.steps"])
    with pytest.raises(ConfigError, match="cannot parse"):
        apply_overrides(_config(), ["train.steps=ten"])


def test_check_known_keys_catches_a_typo_in_a_file():
    config = _config()
    config.train.stesp = 5
    with pytest.raises(ConfigError, match=r"config\.train\.stesp.*train|steps"):
        check_known_keys(config, _config())
    check_known_keys(_config(), _config())


def test_load_config_passes_the_argument(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent("""
        import ml_collections
        def get_config(arg=None):
            return ml_collections.ConfigDict(dict(arg=arg or 'none'))
    """))
    assert load_config(str(path)).arg == "none"
    assert load_config(f"{path}:local").arg == "local"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))
