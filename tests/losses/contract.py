"""The contract every loss in ``kdjax.losses`` keeps, as reusable checks.

A test module describes its loss once as a :class:`LossCase` and subclasses :class:`LossContract`;
pytest then runs every contract check on it: jit, vmap, grad, teacher isolation, bf16, all-masked
batches, sharded execution and (where it holds) zero at identical inputs. Reference checks use
:func:`assert_matches_reference`, which compares value and gradient of the float32 JAX loss with a
float64 NumPy reference differentiated by central differences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Inputs = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LossCase:
    """How to call one loss.

    Attributes:
      loss: the JAX loss, called as ``loss(**arrays, **options)``; returns a scalar, or a tuple of
        scalars when ``outputs`` > 1.
      make_inputs: ``(rng, batch) -> dict`` of float64/int/bool NumPy arrays (argument name -> value).
      student: names of the differentiable student-side arrays.
      teacher: names of the teacher-side arrays (must receive no gradient).
      options: static keyword options.
      mask: name of the (N,H,W) mask argument, or None if the loss takes none.
      identical: ``inputs -> inputs`` making the teacher equal to the student, or None where a zero
        loss at identical inputs does not hold.
      batch_axis: per argument name, the axis that carries the batch (default 0 for every array);
        names mapped to None are not batched (e.g. classifier weights, queue state).
      outputs: number of scalars the loss returns.
    """

    loss: Callable
    make_inputs: Callable[[np.random.Generator, int], Inputs]
    student: tuple[str, ...]
    teacher: tuple[str, ...]
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    mask: str | None = "mask"
    identical: Callable[[Inputs], Inputs] | None = None
    batch_axis: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    outputs: int = 1


def to_jax(inputs: Inputs, float_dtype=jnp.float32) -> dict[str, jax.Array]:
    """Floats to ``float_dtype``; ints and bools keep their kind (ints as int32)."""
    out = {}
    for name, value in inputs.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            out[name] = jnp.asarray(value, float_dtype)
        elif np.issubdtype(value.dtype, np.integer):
            out[name] = jnp.asarray(value, jnp.int32)
        else:
            out[name] = jnp.asarray(value)
    return out


def total(value) -> jax.Array:
    """Sum of the loss outputs (one scalar, or a tuple of scalars), for gradients."""
    if isinstance(value, tuple):
        return sum(value)
    return value


def eager_call(case: LossCase, arrays: Mapping[str, jax.Array], **extra):
    """The loss of ``case`` on ``arrays``, run eagerly (one dispatch per operation)."""
    return case.loss(**arrays, **{**case.options, **extra})


# The checks below run the loss compiled. Eagerly, every operation of a loss is a program of its
# own that XLA compiles on first use (~40 ms each on CPU), which made up most of the loss tests'
# time; test_jit_matches_eager keeps the eager path covered.
def call(case: LossCase, arrays: Mapping[str, jax.Array], **extra):
    """The loss of ``case`` on ``arrays``, compiled."""
    return jax.jit(lambda a: eager_call(case, a, **extra))(arrays)


def grads(case: LossCase, arrays: Mapping[str, jax.Array], names: tuple[str, ...], **extra):
    """Gradient of the summed loss outputs with respect to the named arrays, compiled."""
    fixed = {k: v for k, v in arrays.items() if k not in names}

    def f(wrt):
        return total(eager_call(case, {**fixed, **wrt}, **extra))

    return jax.jit(jax.grad(f))({k: arrays[k] for k in names})


def numeric_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of a float64 scalar function."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = f(x)
        flat[i] = keep - h
        down = f(x)
        flat[i] = keep
        gflat[i] = (up - down) / (2 * h)
    return g


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.linalg.norm(expected), 1e-12)
    return float(np.linalg.norm(actual - expected) / scale)


def dot_count(fn: Callable, *args) -> int:
    """Matrix products (``dot_general``) in the lowered program of ``jax.jit(fn)(*args)``."""
    return jax.jit(fn).lower(*args).as_text().count("dot_general")


def assert_matches_reference(loss: Callable, reference: Callable, inputs: Inputs,
                             wrt: tuple[str, ...], rtol: float = 1e-5, **options) -> None:
    """Value and gradient of the float32 ``loss`` match the float64 NumPy ``reference``.

    ``reference(**inputs, **options)`` returns a float (or tuple of floats, summed for the gradient);
    gradients of the reference are central differences in float64.
    """
    arrays = to_jax(inputs)
    case = LossCase(loss=loss, make_inputs=None, student=wrt, teacher=(), options=options)
    value = call(case, arrays)
    expected = reference(**inputs, **options)
    values = value if isinstance(value, tuple) else (value,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(values, expecteds, strict=True):
        assert got.dtype == jnp.float32, got.dtype
        np.testing.assert_allclose(float(got), float(want), rtol=rtol, atol=1e-7)

    got_grads = grads(case, arrays, wrt)
    for name in wrt:
        def f(x, name=name):
            return float(np.sum(reference(**{**inputs, name: x}, **options)))

        want = numeric_grad(f, inputs[name])
        err = relative_error(got_grads[name], want)
        assert err < rtol, f"gradient w.r.t. {name}: relative error {err:.2e} >= {rtol:.0e}"


class LossContract:
    """Mix-in of contract tests; subclasses set ``case`` (a LossCase)."""

    case: LossCase
    batch = 2

    def inputs(self, batch=None, seed=0) -> Inputs:
        return self.case.make_inputs(np.random.default_rng(seed), batch or self.batch)

    def test_returns_float32_scalars(self):
        out = call(self.case, to_jax(self.inputs()))
        for value in out if isinstance(out, tuple) else (out,):
            assert value.shape == () and value.dtype == jnp.float32
            assert np.isfinite(float(value))

    def test_jit_matches_eager(self):
        arrays = to_jax(self.inputs())
        eager = eager_call(self.case, arrays)
        jitted = call(self.case, arrays)
        np.testing.assert_allclose(np.array(eager), np.array(jitted), rtol=1e-5, atol=1e-7)

    def test_teacher_gets_no_gradient(self):
        if not self.case.teacher:
            pytest.skip("this loss has no teacher-side argument")
        arrays = to_jax(self.inputs())
        g = grads(self.case, arrays, self.case.teacher)
        for name in self.case.teacher:
            assert np.all(np.asarray(g[name]) == 0), f"gradient leaked into {name}"
        student_grads = grads(self.case, arrays, self.case.student)
        assert any(np.any(np.asarray(v) != 0) for v in student_grads.values())

    def test_vmap_matches_loop(self):
        """vmap over a leading axis of independent problems equals a Python loop."""
        problems = [to_jax(self.inputs(seed=s)) for s in range(3)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
        batched = jax.vmap(lambda a: call(self.case, a))(stacked)
        looped = [call(self.case, p) for p in problems]
        looped = jax.tree.map(lambda *xs: jnp.stack(xs), *looped)
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(looped), strict=True):
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)

    def test_grad_is_finite(self):
        g = grads(self.case, to_jax(self.inputs()), self.case.student)
        for name, value in g.items():
            assert np.all(np.isfinite(np.asarray(value))), name

    def test_bf16_inputs_give_float32_close_to_float32(self):
        inputs = self.inputs()
        full = call(self.case, to_jax(inputs))
        half = call(self.case, to_jax(inputs, jnp.bfloat16))
        for got, want in zip(jax.tree.leaves(half), jax.tree.leaves(full), strict=True):
            assert got.dtype == jnp.float32, got.dtype
            # bf16 keeps 8 mantissa bits: inputs are rounded by ~0.4%, the float32 maths adds nothing.
            np.testing.assert_allclose(float(got), float(want), rtol=5e-2, atol=5e-3)

    def test_all_masked_batch_gives_zero_and_zero_gradient(self):
        if self.case.mask is None:
            pytest.skip("this loss takes no mask")
        inputs = self.inputs()
        inputs[self.case.mask] = np.zeros_like(inputs[self.case.mask], bool)
        arrays = to_jax(inputs)
        for value in jax.tree.leaves(call(self.case, arrays)):
            assert float(value) == 0.0
        g = grads(self.case, arrays, self.case.student)
        for name, value in g.items():
            value = np.asarray(value)
            assert np.all(np.isfinite(value)) and np.all(value == 0), name

    def test_zero_at_identical_inputs(self):
        if self.case.identical is None:
            pytest.skip("the loss is not zero at identical inputs")
        arrays = to_jax(self.case.identical(self.inputs()))
        for value in jax.tree.leaves(call(self.case, arrays)):
            assert abs(float(value)) < 1e-5
        g = grads(self.case, arrays, self.case.student)
        for name, value in g.items():
            assert np.all(np.isfinite(np.asarray(value))), name

    def test_sharded_batch_matches_single_device(self):
        devices = np.array(jax.devices())
        if devices.size < 8:
            pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
        mesh = Mesh(devices[:8], ("data",))
        arrays = to_jax(self.inputs(batch=8))
        expected = call(self.case, arrays)

        def sharding(name, value):
            axis = self.case.batch_axis.get(name, 0)
            spec = [None] * value.ndim
            if axis is not None:
                spec[axis] = "data"
            return NamedSharding(mesh, PartitionSpec(*spec))

        placed = {k: jax.device_put(v, sharding(k, v)) for k, v in arrays.items()}
        step = jax.jit(lambda a: (eager_call(self.case, a), grads(self.case, a, self.case.student)))
        got, got_grads = step(placed)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(float(g), float(e), rtol=1e-5, atol=1e-7)
        want_grads = grads(self.case, arrays, self.case.student)
        for name in self.case.student:
            np.testing.assert_allclose(np.asarray(got_grads[name]), np.asarray(want_grads[name]),
                                       rtol=1e-4, atol=1e-7)
