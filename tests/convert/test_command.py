"""``kdjax convert``: a torch.save file in, a model directory out that reproduces the PyTorch model."""

import argparse

import pytest

torch = pytest.importorskip("torch")

from kdjax.commands.convert import add_convert_parser, run_convert  # noqa: E402
from kdjax.io.model_dir import load_model, read_spec  # noqa: E402
from tests.convert.parity import (  # noqa: E402
    assert_outputs_match,
    kdjax_segmentor_outputs,
    random_images,
    torch_segmentor_outputs,
)
from tests.torch_reference import build_cirkd, randomize  # noqa: E402

pytestmark = pytest.mark.torch
NAME = "pspnet_mobilenetv2"


def parse(*argv):
    parser = argparse.ArgumentParser(prog="kdjax")
    add_convert_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["convert", *argv])


def convert(*argv):
    return run_convert(parse(*argv))


@pytest.fixture(scope="module")
def reference():
    return randomize(build_cirkd(NAME, 3, head_channels=8), seed=2)


@pytest.fixture(scope="module")
def torch_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("torch") / "teacher.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 7}, path)
    return path


@pytest.fixture(scope="module")
def converted(torch_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("kdjax") / "teacher"
    return out, convert(f"--model={NAME}", f"--torch={torch_file}", f"--out={out}")


def test_converted_model_matches_pytorch(converted, reference):
    out, status = converted
    assert status == 0
    assert read_spec(out) == {"name": NAME, "num_classes": 3, "variant": "cirkd",
                              "output_stride": 8, "head_width": 8, "aux": False,
                              "width_multiplier": 1.0}
    images = random_images(33, 41)
    assert_outputs_match(kdjax_segmentor_outputs(load_model(out), images),
                         torch_segmentor_outputs(reference, images))


def test_summary_line(torch_file, tmp_path, capsys):
    out = tmp_path / "teacher"
    assert convert(f"--model={NAME}", "--num-classes=3", f"--torch={torch_file}",
                   f"--out={out}") == 0
    line = capsys.readouterr().out.strip()
    params = sum(v.numel() for k, v in torch.load(torch_file)["state_dict"].items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert line == f"converted {NAME}: {params:,} parameters, 3 classes -> {out}"


def assert_fails(capsys, out, *fragments):
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("kdjax convert: error: ")
    for fragment in fragments:
        assert fragment in captured.err
    assert not out.exists()


def test_wrong_class_count(torch_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(f"--model={NAME}", "--num-classes=5", f"--torch={torch_file}",
                   f"--out={out}") == 2
    assert_fails(capsys, out, "num_classes=5, but the checkpoint's classifier has 3 classes",
                 "head.classifier.weight: checkpoint (3, 8, 1, 1), model expects (5, 8, 1, 1)")


def test_wrong_architecture(torch_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert("--model=deeplabv3_mobilenetv2", f"--torch={torch_file}", f"--out={out}") == 2
    assert_fails(capsys, out, "cannot read the class count of 'deeplabv3_mobilenetv2'")
    assert convert("--model=deeplabv3_mobilenetv2", "--num-classes=3", f"--torch={torch_file}",
                   f"--out={out}") == 2
    assert_fails(capsys, out, "missing key", "head.aspp.b0.0.weight",
                 "Is deeplabv3_mobilenetv2 the checkpoint's architecture?")


def test_unknown_model_name_is_a_usage_error(torch_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        parse("--model=unet_resnet18", f"--torch={torch_file}", f"--out={tmp_path}")
    assert caught.value.code == 2
    assert "invalid choice: 'unet_resnet18'" in capsys.readouterr().err


def test_truncated_and_missing_files(torch_file, tmp_path, capsys):
    out = tmp_path / "out"
    truncated = tmp_path / "truncated.pth"
    data = torch_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert convert(f"--model={NAME}", f"--torch={truncated}", f"--out={out}") == 2
    assert_fails(capsys, out, f"cannot read the PyTorch checkpoint {truncated}",
                 "truncated or corrupt")
    assert convert(f"--model={NAME}", f"--torch={tmp_path / 'missing.pth'}", f"--out={out}") == 2
    assert_fails(capsys, out, "PyTorch checkpoint not found", "missing.pth")


def test_existing_output_needs_overwrite(converted, torch_file, capsys):
    out, _ = converted
    capsys.readouterr()
    assert convert(f"--model={NAME}", f"--torch={torch_file}", f"--out={out}") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert convert(f"--model={NAME}", f"--torch={torch_file}", f"--out={out}", "--overwrite") == 0
