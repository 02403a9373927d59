"""benchmarks/camvid/run_records.py: the finished runs of a comparison kept and restored, so that
`kdjax compare` elsewhere reports them without training them again."""

import json
import shutil

import ml_collections
import pytest

from kdjax import training
from kdjax.commands import compare
from tests.benchmarks.test_smoke import load_module
from tests.commands.test_compare import _config

records_module = load_module("camvid/run_records")


def _write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _finished(run, *, model=False):
    for name in ("result.json", "cost.json", "metrics.jsonl"):
        _write(run / name, name)
    _write(run / "checkpoints" / "250" / "state")
    _write(run / "tensorboard" / "events")
    if model:
        _write(run / "model" / "weights")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_save_keeps_finished_runs_records_and_the_teacher_and_restore_fills_the_rest(tmp_path):
    workdir, records = tmp_path / "run", tmp_path / "records"
    _finished(workdir / "teacher", model=True)
    _finished(workdir / "student_alone" / "seed_0", model=True)
    _finished(workdir / "seconds" / "kd" / "seed_1")
    _write(workdir / "kd" / "seed_0" / "checkpoints" / "250" / "state")  # unfinished
    _write(workdir / "results.json")

    saved = records_module.save(workdir, records)
    assert [str(run) for run in saved] == ["seconds/kd/seed_1", "student_alone/seed_0", "teacher"]
    records_files = [f"{run}/{name}" for run in ("seconds/kd/seed_1", "student_alone/seed_0",
                                                 "teacher")
                     for name in ("cost.json", "metrics.jsonl", "result.json")]
    assert _files(records) == sorted(records_files + ["teacher/model/weights"])

    # Saved again after the teacher was exported anew: its old files do not linger.
    (workdir / "teacher" / "model" / "weights").unlink()
    _write(workdir / "teacher" / "model" / "weights_v2")
    records_module.save(workdir, records)
    assert sorted(p.name for p in (records / "teacher" / "model").iterdir()) == ["weights_v2"]

    # Elsewhere: the runs not finished there are restored, and a finished one is left as it is.
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere / "teacher" / "result.json", "trained here")
    restored = records_module.restore(elsewhere, records)
    assert [str(run) for run in restored] == ["seconds/kd/seed_1", "student_alone/seed_0"]
    assert (elsewhere / "teacher" / "result.json").read_text() == "trained here"
    assert not (elsewhere / "teacher" / "model").exists()
    assert (elsewhere / "student_alone" / "seed_0" / "cost.json").read_text() == "cost.json"
    assert records_module.restore(elsewhere, records) == []


@pytest.mark.end_to_end
def test_a_comparison_restored_from_records_reports_its_runs_without_training(
        tmp_path, monkeypatch, capsys):
    # As `make camvid` runs it, from the repository's root; then in a fresh checkout at the same
    # place, from the kept records alone.
    repo, records = tmp_path / "repo", tmp_path / "records"
    repo.mkdir()
    monkeypatch.chdir(repo)
    config = _config()
    config.methods = ml_collections.ConfigDict({"student_alone": ml_collections.ConfigDict()})
    rows = compare.run_compare(config, "run")
    published = (repo / "run" / "results.json").read_text()
    records_module.save(repo / "run", records)
    shutil.rmtree(repo / "run")
    assert records_module.main(["restore", "run", "--records", str(records)]) == 0

    def no_training(*args, **kwargs):
        raise AssertionError("a restored run was trained again")

    monkeypatch.setattr(training, "run_training", no_training)
    capsys.readouterr()
    again = compare.run_compare(config, "run")
    assert [r.to_dict() for r in again] == [r.to_dict() for r in rows]
    assert (repo / "run" / "results.json").read_text() == published
    assert (repo / "run" / "curves.png").stat().st_size > 0
    # The overlays show the teacher, whose model was kept, and not the student alone.
    assert "no 'student alone' panel" in capsys.readouterr().out
    sources = json.loads((repo / "run" / "overlays" / compare.OVERLAY_SOURCES).read_text())
    assert list(sources["sources"]["panels"]) == ["teacher"]
