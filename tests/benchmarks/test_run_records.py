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


def _result(miou):
    return json.dumps({"row": {"miou": miou, "per_class_iou": [miou], "checkpoint_path": "m"}})


def _finished(run, *, model=False, miou=0.5):
    _write(run / "result.json", _result(miou))
    for name in ("cost.json", "metrics.jsonl"):
        _write(run / name, name)
    _write(run / "checkpoints" / "250" / "state")
    _write(run / "tensorboard" / "events")
    if model:
        _write(run / "model" / "weights")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_save_keeps_finished_runs_records_without_weights_and_restore_fills_the_rest(tmp_path):
    workdir, records = tmp_path / "run", tmp_path / "records"
    _finished(workdir / "teacher", model=True)
    _finished(workdir / "student_alone" / "seed_0", model=True)
    _finished(workdir / "seconds" / "kd" / "seed_1")
    _write(workdir / "kd" / "seed_0" / "checkpoints" / "250" / "state")  # unfinished
    _write(workdir / "results.json")

    saved = records_module.save(workdir, records)
    assert [str(run) for run in saved] == ["seconds/kd/seed_1", "student_alone/seed_0", "teacher"]
    assert _files(records) == sorted(
        f"{run}/{name}" for run in ("seconds/kd/seed_1", "student_alone/seed_0", "teacher")
        for name in ("cost.json", "metrics.jsonl", "result.json"))

    # Elsewhere, the teacher trained there: the runs not finished there are restored, and a
    # finished one is left as it is.
    elsewhere = tmp_path / "elsewhere"
    _finished(elsewhere / "teacher", model=True, miou=0.25)
    restored = records_module.restore(elsewhere, records)
    assert [str(run) for run in restored] == ["seconds/kd/seed_1", "student_alone/seed_0"]
    assert json.loads((elsewhere / "teacher" / "result.json").read_text())["row"]["miou"] == 0.25
    assert (elsewhere / "student_alone" / "seed_0" / "cost.json").read_text() == "cost.json"
    assert records_module.restore(elsewhere, records) == []


def test_the_teacher_is_restored_only_with_its_weights_and_a_different_one_is_reported(
        tmp_path, capsys):
    workdir, records = tmp_path / "run", tmp_path / "records"
    _finished(workdir / "teacher", model=True)
    _finished(workdir / "kd" / "seed_0")
    records_module.save(workdir, records)

    # A fresh workdir (a clean checkout): the students' records come back, the teacher is
    # trained again, since every student that is not recorded loads its weights.
    fresh = tmp_path / "fresh"
    assert [str(run) for run in records_module.restore(fresh, records)] == ["kd/seed_0"]
    assert not (fresh / "teacher").exists()
    assert "trains it again" in capsys.readouterr().out
    # A workdir that kept the teacher's weights gets its record back.
    kept = tmp_path / "kept"
    _write(kept / "teacher" / "model" / "weights")
    assert [str(run) for run in records_module.restore(kept, records)] == ["kd/seed_0",
                                                                             "teacher"]

    # The teacher trained again to the same scores is saved silently; to others, with a warning,
    # since the recorded students were distilled from the recorded one.
    _finished(fresh / "teacher", model=True)
    records_module.save(fresh, records)
    assert capsys.readouterr().err == ""
    _finished(fresh / "teacher", model=True, miou=0.51)
    records_module.save(fresh, records)
    assert "is not the recorded one" in capsys.readouterr().err
    assert json.loads((records / "teacher" / "result.json").read_text())["row"]["miou"] == 0.51


def _recorded(run, miou, curve, step_seconds=0.25):
    _write(run / "result.json", json.dumps(
        {"row": {"miou": miou, "steps": 100 * len(curve), "step_seconds": step_seconds}}))
    _write(run / "metrics.jsonl", "\n".join(
        [json.dumps({"split": "train", "step": 50, "loss": 1.0})]
        + [json.dumps({"split": "val", "step": 100 * (i + 1), "miou": v})
           for i, v in reversed(list(enumerate(curve)))]))


def test_progress_tables_each_run_its_curve_its_last_fifth_and_each_methods_seed_mean(
        tmp_path, capsys):
    records = tmp_path / "records"
    curve = [10.0, 20.0, 30.0, 35.0, 34.0, 36.0, 33.0, 36.0, 37.0, 35.5]
    _recorded(records / "kd" / "seed_0", 35.5, curve)
    _recorded(records / "kd" / "seed_1", 37.5, curve)
    _recorded(records / "student_alone" / "seed_0", 30.0, [30.0])
    assert records_module.main(["progress", "--records", str(records)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The curve in step order (the log's order aside); the last fifth is steps 800 to 1,000.
    assert lines[2] == ("| kd/seed_0 | 1000 | 35.50 | 10.0, 20.0, 30.0, 35.0, 34.0, 36.0, 33.0, "
                        "36.0, 37.0, 35.5 | 35.5–37.0 | 0.250 |")
    assert lines[4] == "| student_alone/seed_0 | 100 | 30.00 | 30.0 | 30.0–30.0 | 0.250 |"
    # One method with two seeds: their mean and sample standard deviation (√2).
    assert lines[5:] == ["| kd, 2 seeds | | 36.50 ± 1.41 | | | |"]
    # A workdir's finished runs, in place of the records; a run without a step time.
    _recorded(tmp_path / "run" / "teacher", 50.0, [40.0, 50.0], step_seconds=None)
    assert records_module.main(["progress", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| teacher | 200 | 50.00 | 40.0, 50.0 | 50.0–50.0 |  |"]
    with pytest.raises(SystemExit):
        records_module.main(["save"])
    assert "needs the workdir" in capsys.readouterr().err


def test_progress_draws_the_curves_of_the_runs_directly_under_the_workdir(tmp_path, monkeypatch):
    records = tmp_path / "records"
    _recorded(records / "teacher", 50.0, [40.0, 50.0])
    _recorded(records / "student_alone" / "seed_0", 30.0, [20.0, 30.0])
    _recorded(records / "student_alone" / "seed_1", 31.0, [21.0, 31.0])
    _recorded(records / "kd" / "seed_0", 35.0, [25.0, 35.0])
    _recorded(records / "seconds" / "kd" / "seed_0", 33.0, [33.0])  # another table's run
    drawn = {}
    monkeypatch.setattr(records_module, "plot_curves",
                        lambda path, curves: drawn.update(curves) or path)
    assert records_module.main(["progress", "--records", str(records),
                                "--curves", str(tmp_path / "curves.png")]) == 0
    assert drawn == {"teacher": [[(100, 40.0), (200, 50.0)]],
                     "kd": [[(100, 25.0), (200, 35.0)]],
                     "student alone": [[(100, 20.0), (200, 30.0)], [(100, 21.0), (200, 31.0)]]}
    monkeypatch.undo()
    records_module.progress_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


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

    run_training = training.run_training

    def teacher_only(exp, workdir, *, label, **kwargs):
        assert label.startswith("teacher"), f"a restored run was trained again: {label}"
        return run_training(exp, workdir, label=label, **kwargs)

    monkeypatch.setattr(training, "run_training", teacher_only)
    capsys.readouterr()
    again = compare.run_compare(config, "run")
    # The students as recorded; the teacher trained again to the same scores (its step time is
    # measured anew).
    assert [r.to_dict() for r in again[1:]] == [r.to_dict() for r in rows[1:]]
    assert (again[0].miou, again[0].per_class_iou) == (rows[0].miou, rows[0].per_class_iou)
    assert (json.loads((repo / "run" / "results.json").read_text())[1:]
            == json.loads(published)[1:])
    assert (repo / "run" / "curves.png").stat().st_size > 0
    # The overlays show the teacher, trained again, and not the student alone, whose model was
    # not kept.
    assert "no 'student alone' panel" in capsys.readouterr().out
    sources = json.loads((repo / "run" / "overlays" / compare.OVERLAY_SOURCES).read_text())
    assert list(sources["sources"]["panels"]) == ["teacher"]
