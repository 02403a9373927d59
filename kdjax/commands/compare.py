"""``kdjax compare``: one teacher, then every listed student method under the identical recipe and
seeds, all evaluated the same way, reported as ``results.json``, ``results.md``, ``results.png``
and the validation curves of the runs, ``curves.png``.

Layout of WORKDIR::

    teacher/                 the teacher's training run (unless teacher.checkpoint is given)
    teacher/model/           the trained teacher as a model dir (what the students load)
    <method>/seed_<k>/       one student run: checkpoints/, best/, metrics.jsonl, tensorboard/,
                             model/ (the reported student), cost.json (its measured step cost)
                             and result.json
    results.json, results.md, results.png
    curves.png               validation mIoU against the step (every train.eval_every steps),
                             a panel per method over the student alone: seed mean and band
    overlays/                image | label | teacher | student alone | best method on the first
                             validation images (overlay_*.png), and the prediction panels alone
                             (predictions_*.png, free of dataset pixels); sources.json names the
                             result rows and settings they were drawn from

``config.budget`` (:mod:`kdjax.training.budget`) holds every student run to equal steps (the
default) or to equal measured cost: seconds or FLOPs, or the student alone's cost.

Runs go seed by seed (every method's first seed, the student alone's first, before any second).
Finished runs (those with ``result.json``) are not repeated, so an interrupted comparison resumes
where it stopped; an unfinished run resumes from its last checkpoint. The overlays are drawn again
only if the rows they show, the data or the evaluation settings changed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils.epath import Path

from kdjax import training
from kdjax.data import import_dataset_readers
from kdjax.data.metadata import dataset_info
from kdjax.evaluation import curves, report
from kdjax.evaluation.predictions import (compile_predictor, network_predictor,
                                          write_prediction_overlays)
from kdjax.evaluation.validation import validate
from kdjax.io.networks import Network, load_teacher
from kdjax.io.paths import as_path
from kdjax.runtime.compilation import release_compiled_programs
from kdjax.runtime.sharding import device_batches, make_mesh
from kdjax.training.compile_ahead import CompileAhead
from kdjax.training.metrics_log import read_records
from kdjax.training.budget import (Budget, StepCost, affordable_steps, agreed_cost,
                                   measure_step_cost, parse_budget, read_cost, write_cost)
from kdjax.training.resume import check_same_recipe, recipe_fingerprint

RESULT_FILE = "result.json"
COST_FILE = "cost.json"
OVERLAY_DIR = "overlays"
CURVES_FILE = "curves.png"
OVERLAY_SOURCES = "sources.json"
MODEL_DIR = "model"
IN_TURNS_NOTE = ("Under the student alone's time a method's step is timed in turns with the "
                 "student alone's; its step time here is their ratio times the student alone's "
                 "own step, the clock of the budget, so that its cost is the student alone's up "
                 "to the step that did not fit.")


def _run_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", method)


def _measured_cost(exp: training.Experiment,
                   reference: training.Experiment | None = None) -> StepCost:
    """The cost of one train step of ``exp`` on a batch of its own data, before training;
    ``reference`` (the student alone's experiment) is timed in turns with it on that batch."""
    from kdjax.data.pipeline import make_train_iterator  # tf.data: imported when a pipeline is built

    config = exp.config
    batches = make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                  seed=config.seed)
    batch = next(device_batches(batches, exp.mesh))
    beside = None if reference is None else (
        reference.compile(), reference.init_state(), reference.teacher_inputs(), batch)
    return measure_step_cost(exp.compile(), exp.init_state(), exp.teacher_inputs(), batch,
                             flops=exp.step_flops(), reference=beside)


def _run_config(config: ml_collections.ConfigDict, *, seed: int,
                student_config: ml_collections.ConfigDict,
                terms: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of one run: ``config`` with its seed, model and distillation terms."""
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.seed = seed
    run_config.student = student_config
    run_config.distill.terms = terms
    return run_config


def train_and_report(config: ml_collections.ConfigDict, workdir: Path, *, method: str, seed: int,
                     student_config: ml_collections.ConfigDict,
                     terms: ml_collections.ConfigDict, mesh, budget: Budget = Budget("steps"),
                     reference: StepCost | None = None, prepared: training.Experiment | None = None,
                     alone_terms: ml_collections.ConfigDict | None = None,
                     teacher: Callable[[], Network] | None = None
                     ) -> tuple[report.ResultRow, StepCost | None]:
    """Trains one model (or reads its finished result) and returns its result row and its
    measured step cost (None for a run finished before costs were kept, under equal steps).
    ``prepared``: the run's experiment built (and compiled) ahead, its teacher possibly abstract
    (:mod:`kdjax.training.compile_ahead`); used if its config is the run's. ``teacher``: gives
    the trained teacher that ``prepared`` takes (read once for every run of a comparison).

    Under a matched ``budget`` the run trains the steps its cost affords (``reference``: the
    student alone's cost, for a budget relative to it): the cost is measured once, before
    training, and kept in WORKDIR/cost.json, so that a resumed run trains to the same step. Under
    equal steps the run's own first steps after compilation give it. Under
    ``'seconds:student_alone'`` the student alone (``alone_terms``: its terms) is timed in turns
    with the run, and the ratio of the two times sets the steps; the row gives the run's step
    on the student alone's clock (:meth:`StepCost.seconds_on_clock_of`), so that its cost is the
    student alone's.
    """
    result_path = workdir / RESULT_FILE
    run_config = _run_config(config, seed=seed, student_config=student_config, terms=terms)
    cost = read_cost(workdir / COST_FILE)

    def affordable(cost: StepCost) -> int:
        # The student alone is its own reference: it trains train.steps under its own cost.
        own = cost if method == report.STUDENT_ALONE else reference
        return affordable_steps(budget, cost, config.train.steps, own)

    if result_path.exists():
        if cost is None and budget.matched:  # finished before costs were measured
            cost = _measured_cost(training.setup(run_config, mesh=mesh))
            write_cost(workdir / COST_FILE, cost)
        if cost is not None:
            run_config.train.steps = affordable(cost)
        saved = json.loads(result_path.read_text())
        check_same_recipe(saved["recipe"], run_config, workdir)
        row = report.ResultRow(**saved["row"])
        if cost is not None and cost.reference_seconds is not None:
            # Rows written before their step was put on the student alone's clock.
            row = dataclasses.replace(row, step_seconds=cost.seconds_on_clock_of(reference))
        return row, cost
    if prepared is not None and prepared.config.to_dict() == run_config.to_dict():
        exp = prepared.with_trained_teacher(teacher() if teacher and prepared.teacher else None)
    else:
        exp = training.setup(run_config, mesh=mesh)
    if cost is None and budget.matched:  # the steps depend on it: measured before training
        beside = None
        if budget.in_turns and method != report.STUDENT_ALONE:
            beside = training.setup(_run_config(config, seed=seed, student_config=student_config,
                                                terms=alone_terms), mesh=mesh)
        cost = _measured_cost(exp, beside)
        write_cost(workdir / COST_FILE, cost)
    steps = affordable(cost) if budget.matched else run_config.train.steps
    if steps != run_config.train.steps:
        run_config.train.steps = steps
        exp = training.setup(run_config, mesh=mesh)
    result = training.run_training(exp, workdir, label=f"{method} seed {seed} ")
    if cost is None:  # equal steps: the run's own first steps after compilation
        seconds = result.step_seconds or _measured_cost(exp).seconds
        cost = agreed_cost(seconds, exp.step_flops())
        write_cost(workdir / COST_FILE, cost)
    model_dir = exp.export(result.state, workdir / MODEL_DIR)
    evaluation = result.eval
    row = report.ResultRow(
        method=method, seed=seed, miou=evaluation["miou"],
        per_class_iou=evaluation["per_class_iou"], eval_mode=evaluation["eval_mode"],
        checkpoint=evaluation["checkpoint"], checkpoint_path=str(model_dir), steps=steps,
        step_seconds=cost.seconds_on_clock_of(reference), step_flops=cost.flops)
    if jax.process_index() == 0:
        result_path.write_text(json.dumps(
            {"row": row.to_dict(), "recipe": recipe_fingerprint(run_config)}, indent=1))
    if result.stop is not None:  # heard by the last step: this run is whole, the next not begun
        raise result.stop
    return row, cost


def _teacher_row(config: ml_collections.ConfigDict, mesh) -> report.ResultRow:
    """The given (e.g. converted) teacher, evaluated like the students."""
    network = load_teacher(config.teacher, num_classes=dataset_info(config.data.name).num_classes,
                           mesh=mesh, seed=config.seed)
    evaluation = validate(functools.partial(Network.logits, network), network.variables, config,
                          mesh)
    return report.ResultRow(
        method=report.TEACHER, seed=config.seed, miou=evaluation["miou"],
        per_class_iou=evaluation["per_class_iou"], eval_mode=evaluation["eval_mode"],
        checkpoint="last", checkpoint_path=str(config.teacher.checkpoint))


def best_method(rows: list[report.ResultRow]) -> str | None:
    """The distillation method with the highest mean mIoU over its seeds (None if there is none)."""
    means: dict[str, list[float]] = {}
    for row in rows:
        if row.method not in (report.TEACHER, report.STUDENT_ALONE):
            means.setdefault(row.method, []).append(row.miou)
    return max(means, key=lambda m: np.mean(means[m])) if means else None


def write_comparison_overlays(config: ml_collections.ConfigDict, rows: list[report.ResultRow],
                              out_dir: Path, mesh) -> list[Path]:
    """Predictions of the teacher, the student alone and the best method side by side, the
    students of the first seed (``config.eval.overlays`` validation images)."""
    seed = config.seeds[0]
    shown = [report.TEACHER, report.STUDENT_ALONE, best_method(rows)]
    num_classes = dataset_info(config.data.name).num_classes
    panels = {}
    for method in shown:
        row = next((r for r in rows if r.method == method and
                    (method == report.TEACHER or r.seed == seed)), None)
        if row is None or row.checkpoint_path is None:
            continue
        label = method if method in (report.TEACHER, report.STUDENT_ALONE) else f"best: {method}"
        if not as_path(row.checkpoint_path).exists():
            # A finished run whose record was copied without its model: the others are drawn.
            print(f"overlays: no '{label}' panel: its model {row.checkpoint_path} is not there")
            continue
        panels[label] = row
    sources = overlay_sources(config, panels)
    if (drawn := drawn_overlays(out_dir, sources)) is not None:
        return drawn
    predictors = {}
    for label, row in panels.items():
        model = config.teacher if row.method == report.TEACHER else config.student
        model = ml_collections.ConfigDict({**model.to_dict(), "checkpoint": row.checkpoint_path})
        network = load_teacher(model, num_classes=num_classes, mesh=mesh, seed=config.seed)
        predictors[label] = network_predictor(network, config, num_classes)
    (out_dir / OVERLAY_SOURCES).unlink(missing_ok=True)
    paths = write_prediction_overlays(config, predictors, out_dir, config.eval.overlays,
                                      prediction_only_copies=True)
    record_overlays(out_dir, sources, paths)
    return paths


def compile_overlay_programs(config: ml_collections.ConfigDict, mesh) -> None:
    """Compiles the programs that :func:`write_comparison_overlays` predicts with, one per
    architecture (the teacher's and the students'), from the config alone: the comparison does
    it while its runs train, and the overlays find them in JAX's persistent cache."""
    from kdjax.data.pipeline import eval_image_size  # tf.data, imported by the runs already

    num_classes = dataset_info(config.data.name).num_classes
    images = jax.ShapeDtypeStruct((config.eval.batch_size, *eval_image_size(config.data), 3),
                                  jnp.float32)
    for model in (config.teacher, config.student):
        model = ml_collections.ConfigDict({**model.to_dict(), "checkpoint": "random"})
        network = load_teacher(model, num_classes=num_classes, mesh=mesh, seed=config.seed,
                               materialize=False)
        compile_predictor(network, config, num_classes, images)


def overlay_sources(config: ml_collections.ConfigDict,
                    panels: dict[str, report.ResultRow]) -> dict:
    """What the overlays are drawn from: the shown rows by panel label, and the data and
    evaluation settings (as JSON reads them back)."""
    return json.loads(json.dumps(
        {"panels": {label: row.to_dict() for label, row in panels.items()},
         "data": config.data.to_dict(), "eval": config.eval.to_dict()}))


def record_overlays(out_dir: Path, sources: dict, paths: list[Path]) -> None:
    """Names the overlay files in ``out_dir`` and what they were drawn from, for
    :func:`drawn_overlays`."""
    (out_dir / OVERLAY_SOURCES).write_text(json.dumps(
        {"sources": sources, "files": [p.name for p in paths]}, indent=1))


def drawn_overlays(out_dir: Path, sources: dict) -> list[Path] | None:
    """The overlay files in ``out_dir`` if they were all drawn from ``sources``, else None."""
    try:
        saved = json.loads((out_dir / OVERLAY_SOURCES).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    paths = [out_dir / name for name in saved.get("files", [])]
    if saved.get("sources") != sources or not all(p.exists() for p in paths):
        return None
    return paths


def validation_curves(workdir: Path, runs: dict[tuple[str, int], Path],
                      with_teacher: bool) -> dict[str, list[list[tuple[int, float]]]]:
    """Method → per seed, the (step, validation mIoU) of each evaluation during training, from the
    runs' ``metrics.jsonl`` (the teacher's too where this comparison trained it)."""
    by_method: dict[str, list[list[tuple[int, float]]]] = {}
    if with_teacher:
        by_method[report.TEACHER] = [_curve(workdir / "teacher")]
    for (method, _), run_dir in runs.items():
        name = report.STUDENT_ALONE if method == "student_alone" else method
        by_method.setdefault(name, []).append(_curve(run_dir))
    return by_method


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["miou"]) for r in read_records(run_dir, "val")]


def run_compare(config: ml_collections.ConfigDict, workdir) -> list[report.ResultRow]:
    """Runs the whole comparison of ``config`` in ``workdir`` and writes the reports."""
    workdir = as_path(workdir)
    budget = parse_budget(config.budget)  # a bad budget stops before any work
    mesh = make_mesh()
    info = dataset_info(config.data.name)
    rows = []
    config = ml_collections.ConfigDict(config.to_dict())
    methods = dict(config.methods)
    if not methods:
        raise ValueError("config.methods is empty: list the student methods to compare, e.g. "
                         "methods.student_alone = ConfigDict() and methods.cwd = <terms>.")
    # Seed by seed, so that an interrupted comparison has every method's first seed before any
    # second one; in each, the baseline first (a budget relative to it needs its cost), then the
    # methods in name order (ConfigDict keeps keys sorted).
    order = sorted(methods, key=lambda m: (m != "student_alone", m))
    runs = {(method, seed): workdir / _run_name(method) / f"seed_{seed}"
            for seed in config.seeds for method in order}
    train_teacher = config.teacher.checkpoint is None
    student_runs = ml_collections.ConfigDict(config.to_dict())
    student_runs.teacher.checkpoint = (str(workdir / "teacher" / MODEL_DIR) if train_teacher
                                       else config.teacher.checkpoint)
    # The students' experiments are built and compiled on a background thread while the
    # foreground traces, trains, evaluates and exports (it pauses while a run's step is timed);
    # their teacher need not exist yet (materialize=False).
    builds = {str(run_dir): functools.partial(
        training.setup, _run_config(student_runs, seed=seed, student_config=config.student,
                                    terms=methods[method]), mesh=mesh, materialize=False)
        for (method, seed), run_dir in runs.items() if not (run_dir / RESULT_FILE).exists()}
    then = functools.partial(compile_overlay_programs, student_runs, mesh)
    import_dataset_readers(config.data.name)  # before the builder's thread: see its docstring
    with CompileAhead(builds, then=then if config.eval.overlays else None) as ahead:
        if train_teacher:
            teacher_config = ml_collections.ConfigDict(config.to_dict())
            if config.teacher_steps:
                teacher_config.train.steps = config.teacher_steps
            row, _ = train_and_report(teacher_config, workdir / "teacher", method=report.TEACHER,
                                      seed=config.seed, student_config=config.teacher,
                                      terms=ml_collections.ConfigDict(), mesh=mesh)
            release_compiled_programs()
            rows.append(row)
        else:
            rows.append(_teacher_row(config, mesh))
        config = student_runs
        teacher = functools.cache(functools.partial(training.trained_teacher, config, mesh))
        alone_costs: dict[int, StepCost] = {}
        for (method, seed), run_dir in runs.items():
            name = report.STUDENT_ALONE if method == "student_alone" else method
            row, cost = train_and_report(
                config, run_dir, method=name, seed=seed, student_config=config.student,
                terms=methods[method], mesh=mesh, budget=budget,
                reference=alone_costs.get(seed), prepared=ahead.claim(str(run_dir)),
                alone_terms=methods.get("student_alone"), teacher=teacher)
            release_compiled_programs()  # a long comparison would run out of memory mappings
            rows.append(row)
            if method == "student_alone":
                alone_costs[seed] = cost
    if jax.process_index() == 0:
        table = report.write_results(workdir, rows, info.class_names, budget=budget.describe(),
                                     step_note=IN_TURNS_NOTE if budget.in_turns else None,
                                     matched=budget.matched)
        print(table)
        curves.plot_curves(workdir / CURVES_FILE, validation_curves(workdir, runs, train_teacher))
        overlays = []
        if config.eval.overlays:
            overlays = write_comparison_overlays(config, rows, workdir / OVERLAY_DIR, mesh)
        print(f"\nresults: {workdir / 'results.md'}, {workdir / 'results.json'}; "
              f"plots: {workdir / 'results.png'}, {workdir / CURVES_FILE}; {len(overlays)} "
              f"overlays in {workdir / OVERLAY_DIR}")
    return rows
