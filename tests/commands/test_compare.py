"""`kdjax compare` end to end on the tiny config: teacher, student alone and a distilled student,
reports written, finished runs reused, and a changed recipe refused."""

import json
import pathlib
import signal

import ml_collections
import numpy as np
import pytest
from PIL import Image

from kdjax.commands import compare
from kdjax.evaluation import report
from kdjax.config.loading import ConfigError, load_config
from kdjax.evaluation.overlays import PANEL_GAP
from kdjax.config.recipes import method_terms
from kdjax.runtime.preemption import StopRequested
from tests.training.test_train import CONFIG, signal_at_last_save


def _config():
    config = load_config(CONFIG)
    config.teacher.checkpoint = None  # compare trains it
    config.teacher_steps = 2
    config.train.steps = 2
    config.train.eval_every = config.train.checkpoint_every = 2
    config.methods = ml_collections.ConfigDict({"student_alone": ml_collections.ConfigDict(),
                                                "kd": method_terms("kd")})
    return config


def _memory_mappings() -> int | None:
    maps = pathlib.Path("/proc/self/maps")
    return len(maps.read_text().splitlines()) if maps.exists() else None


@pytest.mark.end_to_end
def test_compare_trains_reports_and_resumes(tmp_path, capsys, monkeypatch):
    mappings = []
    train = compare.train_and_report

    def counted(*args, **kwargs):
        mappings.append(_memory_mappings())
        return train(*args, **kwargs)

    monkeypatch.setattr(compare, "train_and_report", counted)
    rows = compare.run_compare(_config(), tmp_path)
    assert [r.method for r in rows] == [report.TEACHER, report.STUDENT_ALONE, "kd"]
    assert all(0.0 <= r.miou <= 100.0 and r.eval_mode.startswith("whole") for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {tuple(sorted(row)) for row in saved} == {tuple(sorted(
        ["method", "seed", "miou", "per_class_iou", "eval_mode", "checkpoint",
         "checkpoint_path", "steps", "step_seconds", "step_flops"]))}
    assert [r.steps for r in rows] == [2, 2, 2] and all(r.step_seconds > 0 for r in rows)
    assert (tmp_path / "results.png").stat().st_size > 0
    # The validation curves: every evaluation during training, per method and seed.
    assert (tmp_path / "curves.png").stat().st_size > 0
    curves = compare.validation_curves(
        tmp_path, {("student_alone", 0): tmp_path / "student_alone" / "seed_0"}, True)
    assert list(curves) == [report.TEACHER, report.STUDENT_ALONE]
    assert [[step for step, _ in seed] for seed in curves[report.STUDENT_ALONE]] == [[2]]
    assert curves[report.TEACHER][0][-1][1] == pytest.approx(rows[0].miou, abs=1e-6)
    table = (tmp_path / "results.md").read_text()
    assert "| teacher |" in table and "| student alone |" in table and "| kd |" in table
    assert "results.md" in capsys.readouterr().out
    # The students distilled from the teacher that compare trained and exported.
    assert (tmp_path / "teacher" / "model" / "model_spec.json").exists()
    # Overlays: image | label | teacher | student alone | the best method, and a copy without
    # the dataset's pixels.
    overlays = sorted((tmp_path / "overlays").glob("overlay_*.png"))
    copies = sorted((tmp_path / "overlays").glob("predictions_*.png"))
    assert len(overlays) == len(copies) == _config().eval.overlays
    full, bare = (np.asarray(Image.open(p)) for p in (overlays[0], copies[0]))
    width = (full.shape[1] + PANEL_GAP) // 5 - PANEL_GAP
    assert bare.shape[1] == 3 * width + 2 * PANEL_GAP
    assert compare.best_method(rows) == "kd"
    # The student alone's run leaves its compiled programs behind neither in JAX's caches nor in
    # memory mappings (about 1,800 of them otherwise: a long comparison ran out of them).
    if mappings[0] is not None:
        assert mappings[2] - mappings[1] < 600, mappings

    # Finished runs are reused as they are, and so are overlays drawn from the same rows ...
    drawn = {p: p.stat().st_mtime_ns for p in overlays + copies}
    again = compare.run_compare(_config(), tmp_path)
    assert [r.miou for r in again] == [r.miou for r in rows]
    assert {p: p.stat().st_mtime_ns for p in drawn} == drawn
    # ... unless the recipe changed, which would mix two experiments in one table.
    changed = _config()
    changed.train.learning_rate = 0.5
    with pytest.raises(ConfigError, match=r"another recipe \(changed: .*train\.learning_rate"):
        compare.run_compare(changed, tmp_path)


@pytest.mark.end_to_end
def test_a_signal_at_a_runs_last_step_stops_the_comparison_before_the_next_run(
        tmp_path, monkeypatch):
    signal_at_last_save(monkeypatch, signal.SIGINT, where="student_alone")
    with pytest.raises(StopRequested, match="after step 2, the run's last"):
        compare.run_compare(_config(), tmp_path)
    finished = tmp_path / "student_alone" / "seed_0"
    assert (finished / compare.RESULT_FILE).exists() and (finished / compare.MODEL_DIR).is_dir()
    assert not (tmp_path / "kd").exists()


def test_overlays_are_drawn_again_unless_their_sources_and_files_are_unchanged(tmp_path):
    config = _config()
    row = report.ResultRow(method=report.TEACHER, seed=0, miou=50.0, per_class_iou={"road": 50.0},
                           eval_mode="whole", checkpoint="last", checkpoint_path="/m")
    sources = compare.overlay_sources(config, {report.TEACHER: row})
    assert compare.drawn_overlays(tmp_path, sources) is None  # nothing drawn yet
    files = [tmp_path / "overlay_000.png", tmp_path / "overlay_001.png"]
    for path in files:
        path.write_bytes(b"png")
    compare.record_overlays(tmp_path, sources, files)
    assert compare.drawn_overlays(tmp_path, sources) == files

    retrained = compare.overlay_sources(
        config, {report.TEACHER: report.ResultRow(**{**row.to_dict(), "miou": 51.0})})
    assert compare.drawn_overlays(tmp_path, retrained) is None
    config.eval.overlays = 1
    assert compare.drawn_overlays(tmp_path, compare.overlay_sources(
        config, {report.TEACHER: row})) is None
    files[1].unlink()
    assert compare.drawn_overlays(tmp_path, sources) is None
    (tmp_path / compare.OVERLAY_SOURCES).write_text("{")  # killed while writing it
    assert compare.drawn_overlays(tmp_path, sources) is None


def test_the_overlays_programs_compiled_from_the_config_serve_the_trained_networks(tmp_path):
    """A comparison compiles its overlays' programs while its runs train, before any network
    exists: the programs that the trained networks then predict with are those."""
    import jax
    from flax import nnx

    from kdjax.data.metadata import dataset_info
    from kdjax.data.pipeline import eval_image_size
    from kdjax.evaluation.predictions import network_predictor
    from kdjax.io.model_dir import save_model
    from kdjax.io.networks import build_model, load_teacher
    from kdjax.runtime.sharding import make_mesh

    config = _config()
    config.eval.overlays = 2
    mesh = make_mesh()
    num_classes = dataset_info(config.data.name).num_classes
    lowered = []
    real_compile = jax.stages.Lowered.compile
    record = lambda self, *a, **k: lowered.append(self.as_text()) or real_compile(self, *a, **k)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax.stages.Lowered, "compile", record)
        compare.compile_overlay_programs(config, mesh)
    assert len(lowered) == 2   # the teacher's architecture and the students'
    images = np.zeros((config.eval.batch_size, *eval_image_size(config.data), 3),
                      np.float32)
    for i, model in enumerate((config.teacher, config.student)):
        save_model(tmp_path / str(i), build_model(model, num_classes=num_classes,
                                                  rngs=nnx.Rngs(i)))
        model = ml_collections.ConfigDict({**model.to_dict(), "checkpoint": str(tmp_path / str(i))})
        network = load_teacher(model, num_classes=num_classes, mesh=mesh, seed=0)
        predict = network_predictor(network, config, num_classes)
        assert predict.func.lower(*predict.args, images).as_text() == lowered[i]


def test_tfds_is_imported_before_the_compile_ahead_thread_starts(tmp_path, monkeypatch):
    events = []

    class Started(Exception):
        pass

    def compile_ahead(builds, then=None):
        events.append("thread")
        raise Started

    monkeypatch.setattr(compare, "import_dataset_readers",
                        lambda name: events.append(f"import {name}"))
    monkeypatch.setattr(compare, "CompileAhead", compile_ahead)
    with pytest.raises(Started):
        compare.run_compare(_config(), tmp_path)
    assert events == ["import synthetic", "thread"]


def test_runs_go_seed_by_seed_with_the_student_alone_first_in_each(tmp_path, monkeypatch):
    """An interrupted comparison holds every method's first seed before any second one; the
    table still lists each method once, its seeds together."""
    trained = []

    def fake_train(config, workdir, *, method, seed, **kwargs):
        trained.append((method, seed))
        row = report.ResultRow(method=method, seed=seed, miou=float(len(trained)),
                               per_class_iou={}, eval_mode="whole", checkpoint="last",
                               checkpoint_path=None, steps=2, step_seconds=0.1, step_flops=1e9)
        return row, compare.StepCost(seconds=0.1, flops=1e9)

    class NothingAhead:  # nothing is trained, so nothing is compiled ahead
        def __init__(self, builds, then=None):
            del builds, then

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def claim(self, key):
            del key

    monkeypatch.setattr(compare, "train_and_report", fake_train)
    monkeypatch.setattr(compare, "CompileAhead", NothingAhead)
    config = _config()
    config.seeds = (0, 1)
    config.eval.overlays = 0
    config.methods = ml_collections.ConfigDict({"student_alone": ml_collections.ConfigDict(),
                                                "kd": method_terms("kd"),
                                                "dist": method_terms("dist")})
    rows = compare.run_compare(config, tmp_path)
    assert trained == [(report.TEACHER, 0), (report.STUDENT_ALONE, 0), ("dist", 0), ("kd", 0),
                       (report.STUDENT_ALONE, 1), ("dist", 1), ("kd", 1)]
    assert len(rows) == 7
    methods = [line.split("|")[1].strip() for line in
               (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert methods.count("kd") == 1 and methods.count("dist") == 1
