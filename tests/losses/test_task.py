import numpy as np
import pytest

from kdjax.losses.task import cross_entropy
from tests.losses.contract import LossCase, LossContract, assert_matches_reference, to_jax
from tests.references import task_ref


def make_inputs(rng, batch, size=(3, 4), classes=4, ignore_label=255):
    labels = rng.integers(0, classes, (batch, *size))
    labels[rng.random(labels.shape) < 0.2] = ignore_label
    return {
        "logits": rng.normal(0, 2, (batch, *size, classes)),
        "labels": labels,
        "mask": rng.random(labels.shape) > 0.2,
    }


class TestCrossEntropyContract(LossContract):
    case = LossCase(loss=cross_entropy, make_inputs=make_inputs, student=("logits",), teacher=())


@pytest.mark.parametrize("ignore_label", [255, -1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(ignore_label, weighted, masked):
    rng = np.random.default_rng(1)
    inputs = make_inputs(rng, 2, ignore_label=ignore_label)
    if not masked:
        inputs.pop("mask")
    options = {"ignore_label": ignore_label}
    if weighted:
        options["class_weights"] = rng.uniform(0.5, 2.0, 4)
    assert_matches_reference(cross_entropy, task_ref.cross_entropy, inputs, ("logits",), **options)


def test_all_ignored_labels_give_zero_and_zero_gradient():
    import jax
    arrays = to_jax(make_inputs(np.random.default_rng(2), 2))
    labels = np.full(arrays["labels"].shape, 255)
    value, grad = jax.value_and_grad(lambda z: cross_entropy(z, labels))(arrays["logits"])
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


@pytest.mark.torch
def test_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    inputs = make_inputs(rng, 2, ignore_label=-1)
    weights = rng.uniform(0.5, 2.0, 4)
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(inputs["logits"]).permute(0, 3, 1, 2), torch.from_numpy(inputs["labels"]),
        weight=torch.from_numpy(weights), ignore_index=-1)
    got = cross_entropy(to_jax(inputs)["logits"], inputs["labels"], ignore_label=-1,
                        class_weights=weights)
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)


def test_bad_input_raises():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 1))
    with pytest.raises(ValueError, match=r"labels must have the \(N,H,W\) shape"):
        cross_entropy(arrays["logits"], arrays["labels"][:, :2])
    with pytest.raises(ValueError, match="class_weights"):
        cross_entropy(arrays["logits"], arrays["labels"], class_weights=np.ones(3))
