"""Compute-matched comparisons: budgets parse, costs are measured once and kept, and under a
matched budget every student trains the steps its cost affords, ranked in a second table."""

import json
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import training
from kdjax.commands import compare
from kdjax.config.recipes import method_terms
from kdjax.evaluation import report
from kdjax.runtime.sharding import global_batch
from kdjax.training.budget import (Budget, BudgetError, StepCost, StepTimer, affordable_steps,
                                   measure_step_cost, measure_step_costs, parse_budget)
from tests.training import tiny_config


def test_budgets_parse_and_bad_ones_say_what_is_accepted():
    assert parse_budget("steps") == Budget("steps") and not Budget("steps").matched
    assert parse_budget("seconds:600") == Budget("seconds", 600.0)
    assert parse_budget("flops:2.5e15") == Budget("flops", 2.5e15)
    assert parse_budget("seconds:student_alone").relative
    for bad in ("minutes:3", "seconds", "seconds:-1", "flops:many", "seconds:inf"):
        with pytest.raises(BudgetError, match="config.budget"):
            parse_budget(bad)


def test_a_bad_budget_stops_compare_before_any_work(tmp_path):
    with pytest.raises(BudgetError, match="minutes:3"):
        compare.run_compare(_demo("minutes:3"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_affordable_steps():
    cost = StepCost(seconds=0.5, flops=4e9)
    assert affordable_steps(Budget("steps"), cost, 120) == 120
    assert affordable_steps(Budget("seconds", 10.0), cost, 120) == 20
    assert affordable_steps(Budget("flops", 1e10), cost, 120) == 2
    assert affordable_steps(Budget("seconds", 0.1), cost, 120) == 1   # at least one step
    # Relative: the student alone's cost at 120 steps, spent at this run's cost per step.
    alone = StepCost(seconds=0.25, flops=1e9)
    assert affordable_steps(Budget("seconds"), cost, 120, alone) == 60
    assert affordable_steps(Budget("flops"), cost, 120, alone) == 30
    with pytest.raises(BudgetError, match="student_alone"):
        affordable_steps(Budget("seconds"), cost, 120)
    # In seconds, the student alone timed beside the run sets the ratio, whatever its own run
    # measured on a busier machine (and FLOPs do not drift).
    beside = StepCost(seconds=0.5, flops=2e9, reference_seconds=0.125)
    assert affordable_steps(Budget("seconds"), beside, 120, StepCost(1.0, 1e9)) == 30
    assert affordable_steps(Budget("flops"), beside, 120, alone) == 60
    assert affordable_steps(Budget("seconds", 10.0), beside, 120) == 20
    # Its step on the student alone's clock is the ratio times the student alone's own step:
    # the 30 steps then cost the student alone's 120.
    assert beside.seconds_on_clock_of(StepCost(1.0, 1e9)) == 4.0
    assert 30 * beside.seconds_on_clock_of(StepCost(1.0, 1e9)) == 120 * 1.0
    assert beside.seconds_on_clock_of(None) == cost.seconds_on_clock_of(alone) == 0.5
    assert Budget("seconds").in_turns and not Budget("flops").in_turns
    assert not Budget("seconds", 10.0).in_turns


def test_a_step_is_measured_after_its_compilation_with_its_flop_count():
    exp = training.setup(tiny_config.get_config())
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 19, size=(8, 32, 32)).astype(np.int32)}
    batch = global_batch(batch, exp.mesh)
    flops = exp.step_flops()
    assert flops > 0
    calls = []
    compiled = exp.compile()

    def counted(*args):
        calls.append(1)
        return compiled(*args)
    cost = measure_step_cost(counted, exp.init_state(), exp.teacher_inputs(), batch, flops=flops,
                             timed_steps=2)
    assert len(calls) == 3 and cost.seconds > 0 and cost.flops == flops


def test_steps_timed_in_turns_each_after_its_compilation():
    calls = []

    def step(name, pause):
        def run(state, teacher_variables, batch):
            calls.append(name)
            time.sleep(pause)
            return state + 1, jnp.zeros(())
        return run

    seconds = measure_step_costs([(step("a", 0.02), 0, None, None),
                                  (step("b", 0.06), 0, None, None)], timed_steps=2)
    assert calls == ["a", "b"] * 3
    assert 0.02 <= seconds[0] < seconds[1] and seconds[1] >= 0.06
    cost = measure_step_cost(step("c", 0.0), 0, None, None, flops=1.0, timed_steps=1,
                             reference=(step("d", 0.0), 0, None, None))
    assert calls[-4:] == ["c", "d", "c", "d"] and cost.reference_seconds > 0


def test_the_timer_leaves_out_the_first_step():
    timer = StepTimer(timed_steps=2)
    assert timer.seconds is None
    for _ in range(3):
        timer.start()
        timer.stop(jnp.zeros(()))
    assert timer.done and len(timer.times) == 2


def _demo(budget):
    """The tiny config as a comparison of the student alone and PFS + WPI under ``budget``, with
    the tiny config's random teacher (the budgets concern the students)."""
    config = tiny_config.get_config()
    config.methods = ml_collections.ConfigDict({"student_alone": ml_collections.ConfigDict(),
                                                "pfs_wpi": method_terms("pfs_wpi")})
    config.train.steps = 4
    config.train.eval_every = config.train.checkpoint_every = 4
    config.budget = budget
    return config


@pytest.mark.end_to_end
def test_compare_under_the_student_alones_budget(tmp_path):
    rows = compare.run_compare(_demo("seconds:student_alone"), tmp_path)
    by_method = {r.method: r for r in rows}
    alone, method = by_method[report.STUDENT_ALONE], by_method["pfs_wpi"]
    assert alone.steps == 4
    costs = {m: json.loads((tmp_path / d / "seed_0" / "cost.json").read_text())
             for m, d in (("alone", "student_alone"), ("method", "pfs_wpi"))}
    # The student alone timed beside the method sets the ratio.
    assert costs["alone"]["reference_seconds"] is None
    expected = max(1, int(costs["method"]["reference_seconds"] * 4 // costs["method"]["seconds"]))
    assert method.steps == expected
    assert method.step_flops > 0
    # The method's step on the student alone's clock: its cost is the student alone's, up to
    # the step that did not fit, whatever the machine's speed when each was timed.
    assert alone.step_seconds == costs["alone"]["seconds"]
    assert method.step_seconds == pytest.approx(
        costs["method"]["seconds"] * costs["alone"]["seconds"] / costs["method"]["reference_seconds"])
    budget = alone.steps * alone.step_seconds
    assert budget - method.step_seconds < method.steps * method.step_seconds <= budget * (1 + 1e-9)
    table = (tmp_path / "results.md").read_text()
    assert "Budget: seconds budget: the student alone's cost per run." in table
    assert compare.IN_TURNS_NOTE in table
    assert "## Ranking under the matched budget" in table
    # The costs are kept: the comparison resumes without measuring or training again.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed_0/cost.json")}
    again = compare.run_compare(_demo("seconds:student_alone"), tmp_path)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in rows]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_compare_under_a_fixed_flop_budget_trains_the_steps_it_affords(tmp_path):
    probe = compare.run_compare(_demo("steps"), tmp_path / "probe")
    flops = {r.method: r.step_flops for r in probe}
    budget = 3 * flops[report.STUDENT_ALONE]
    rows = compare.run_compare(_demo(f"flops:{budget!r}"), tmp_path / "matched")
    for row in rows[1:]:
        assert row.steps == max(1, int(budget // flops[row.method]))
        assert row.steps * row.step_flops <= budget
    assert "## Ranking" not in (tmp_path / "probe" / "results.md").read_text()


def test_old_result_files_still_load(tmp_path):
    row = {"method": "kd", "seed": 0, "miou": 50.0, "per_class_iou": {"road": 90.0},
           "eval_mode": "whole, scale 1.0", "checkpoint": "last", "checkpoint_path": None}
    (tmp_path / "results.json").write_text(json.dumps([row]))
    (loaded,) = report.load_results(tmp_path)
    assert loaded.steps is None and loaded.miou == 50.0
    assert "| kd | 1 | 50.00 | — | — | — | — | — | — |" in report.results_markdown(
        [loaded], ["road"])
