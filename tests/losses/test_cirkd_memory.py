import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.losses.cirkd_memory import (CirkdMemory, cirkd_memory, init_cirkd_memory,
                                       update_cirkd_memory)
from tests.losses.contract import (LossCase, LossContract, assert_matches_reference, dot_count,
                                   to_jax)
from tests.references import cirkd_memory_ref

# The module itself (kdjax.losses re-exports a function of the same name).
cm = importlib.import_module("kdjax.losses.cirkd_memory")

K, C, S_PIX, S_REG = 3, 4, 12, 6
FEAT_HW = (3, 4)
LABEL_HW = (6, 8)  # labels come at a larger size and are nearest-resized to the feature size
IGNORE = 255
SMALL = {"pixel_contrast": 8, "region_contrast": 5}  # 3 of 12 pixel slots, 2 of 6 region slots


def unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_labels(rng, batch, size=LABEL_HW, classes=(0, 1, 2, IGNORE)):
    return rng.choice(np.array(classes), size=(batch, *size)).astype(np.int32)


def make_inputs(rng, batch):
    shape = (batch, *FEAT_HW, C)
    return {
        "student_embed": rng.normal(0, 1, shape),
        "teacher_embed": rng.normal(0, 1, shape),
        "labels": make_labels(rng, batch),
        "mask": rng.random(shape[:3]) > 0.2,
        "pixel_queue": unit_rows(rng, (K, S_PIX, C)),
        "pixel_ptr": rng.integers(0, S_PIX, K).astype(np.int32),
        "region_queue": unit_rows(rng, (K, S_REG, C)),
        "region_ptr": rng.integers(0, S_REG, K).astype(np.int32),
        "seed": np.array(rng.integers(0, 2**16), np.int32),
    }


def memory_of(a):
    return CirkdMemory(a["pixel_queue"], a["pixel_ptr"], a["region_queue"], a["region_ptr"])


def loss_from_arrays(student_embed, teacher_embed, labels, pixel_queue, pixel_ptr, region_queue,
                     region_ptr, seed, mask=None, **options):
    memory = CirkdMemory(pixel_queue, pixel_ptr, region_queue, region_ptr)
    return cirkd_memory(student_embed, teacher_embed, labels, memory, jax.random.key(seed),
                        mask=mask, **options)


def same_teacher(inputs):
    return {**inputs, "teacher_embed": inputs["student_embed"].copy()}


NOT_BATCHED = {name: None for name in
               ("pixel_queue", "pixel_ptr", "region_queue", "region_ptr", "seed")}


class TestCirkdMemoryContract(LossContract):
    case = LossCase(loss=loss_from_arrays, make_inputs=make_inputs, student=("student_embed",),
                    teacher=("teacher_embed", "pixel_queue", "region_queue"), options=SMALL,
                    identical=same_teacher, batch_axis=NOT_BATCHED, outputs=2)


def indices_for(inputs, **options):
    """The contrast slots the public function draws for these inputs."""
    arrays = to_jax(inputs)
    return cm._contrast_indices(jax.random.key(arrays["seed"]), memory_of(arrays),
                                options.get("pixel_contrast", 4096),
                                options.get("region_contrast", 1024))


def reference_with(pixel_index, region_index):
    def reference(student_embed, teacher_embed, labels, pixel_queue, region_queue, mask=None,
                  **options):
        options = {k: v for k, v in options.items()
                   if k in ("tau", "kd_tau", "ignore_label")}
        return cirkd_memory_ref.cirkd_memory(student_embed, teacher_embed, labels, pixel_queue,
                                             region_queue, np.asarray(pixel_index),
                                             np.asarray(region_index), mask=mask, **options)

    def with_extras(pixel_ptr=None, region_ptr=None, seed=None, **kwargs):
        return reference(**kwargs)

    return with_extras


LAYOUTS = {
    # labels at twice the feature size, with ignore pixels
    "resized_with_ignore": lambda rng: make_labels(rng, 2),
    # labels already at the feature size
    "same_size": lambda rng: make_labels(rng, 2, size=FEAT_HW),
    # one class only, a non-integer resize factor, -1 and out-of-range labels ignored too
    "one_class_odd_resize": lambda rng: make_labels(rng, 2, size=(5, 7), classes=(1, -1, 7)),
    # the second image has no anchor at all
    "empty_image": lambda rng: np.concatenate(
        [make_labels(rng, 1), np.full((1, *LABEL_HW), IGNORE, np.int32)]),
}


@pytest.mark.parametrize("layout, masked", [
    ("resized_with_ignore", False), ("resized_with_ignore", True), ("same_size", False),
    ("one_class_odd_resize", True), ("empty_image", False)])
def test_matches_reference(layout, masked):
    rng = np.random.default_rng(1)
    inputs = make_inputs(rng, 2)
    inputs["labels"] = LAYOUTS[layout](rng)
    if not masked:
        inputs.pop("mask")
    pixel_index, region_index = indices_for(inputs, **SMALL)
    assert_matches_reference(loss_from_arrays, reference_with(pixel_index, region_index), inputs,
                             ("student_embed",), **SMALL)


def test_anchor_rows_in_blocks_with_a_padded_last_block_match_reference():
    # 2 images of 3×4 pixels in blocks of 5 rows: five blocks, the last one padded with 1 row.
    rng = np.random.default_rng(1)
    inputs = make_inputs(rng, 2)
    pixel_index, region_index = indices_for(inputs, **SMALL)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cm, "_ROWS_PER_STEP", 5)
            jax.clear_caches()  # the row count is read when the jitted loss is traced
            assert_matches_reference(loss_from_arrays, reference_with(pixel_index, region_index),
                                     inputs, ("student_embed",), **SMALL)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("options", [
    {"tau": 0.5, "kd_tau": 2.0, **SMALL},
    # default pixel_contrast: all 12 slots of the tiny queue; a single region slot per class;
    # class 0 ignored and 255 out of range
    {"tau": 0.2, "kd_tau": 4.0, "region_contrast": 0, "ignore_label": 0},
])
def test_matches_reference_options(options):
    inputs = make_inputs(np.random.default_rng(2), 2)
    pixel_index, region_index = indices_for(inputs, **options)
    assert_matches_reference(loss_from_arrays, reference_with(pixel_index, region_index), inputs,
                             ("student_embed",), **options)


def test_contrast_indices_are_a_shared_random_subset():
    memory = CirkdMemory(jnp.zeros((K, S_PIX, C)), jnp.zeros(K, jnp.int32),
                         jnp.zeros((K, S_REG, C)), jnp.zeros(K, jnp.int32))
    key = jax.random.key(3)
    pix, reg = cm._contrast_indices(key, memory, 8, 5)
    assert pix.shape == (8 // K + 1,) and reg.shape == (5 // K + 1,)
    for idx, size in ((pix, S_PIX), (reg, S_REG)):
        idx = np.asarray(idx)
        assert idx.dtype == np.int32
        assert np.all((idx >= 0) & (idx < size)) and len(set(idx.tolist())) == idx.size
    # Deterministic per key, different for another key.
    again = cm._contrast_indices(key, memory, 8, 5)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(pix))
    draws = {tuple(np.asarray(cm._contrast_indices(jax.random.key(s), memory, 8, 5)[0]))
             for s in range(10)}
    assert len(draws) > 1
    # More slots requested than the queue holds: the whole queue, as a permutation.
    full_pix, full_reg = cm._contrast_indices(key, memory, 4096, 1024)
    assert sorted(np.asarray(full_pix).tolist()) == list(range(S_PIX))
    assert sorted(np.asarray(full_reg).tolist()) == list(range(S_REG))
    assert cm._contrast_sizes(memory, 4096, 1024) == (S_PIX, S_REG)


def test_contrast_set_uses_the_same_slots_for_every_class():
    # Row (class c, slot i) holds the code 100·c + i, so the gathered set reveals what was taken.
    codes = 100 * np.arange(K)[:, None] + np.arange(S_PIX)[None, :]
    queue = jnp.asarray(np.repeat(codes[..., None], C, axis=-1), jnp.float32)
    index = jnp.array([7, 2, 11], jnp.int32)
    got = np.asarray(cm._gather_contrast(queue, index))[:, 0]
    want = [100 * c + i for c in range(K) for i in (7, 2, 11)]
    np.testing.assert_array_equal(got, want)


def test_no_anchor_gives_zero_and_zero_gradient():
    inputs = make_inputs(np.random.default_rng(4), 2)
    for labels in (np.full((2, *LABEL_HW), IGNORE, np.int32),
                   np.full((2, *LABEL_HW), -1, np.int32),
                   np.full((2, *LABEL_HW), K, np.int32)):  # only labels outside [0, K)
        arrays = to_jax({**inputs, "labels": labels})
        for value in loss_from_arrays(**arrays, **SMALL):
            assert float(value) == 0.0
        g = jax.grad(lambda s, a=arrays: sum(loss_from_arrays(**{**a, "student_embed": s},
                                                              **SMALL)))(arrays["student_embed"])
        assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) == 0)


def test_nonnegative_and_invariant_to_embedding_scale():
    rng = np.random.default_rng(5)
    arrays = to_jax(make_inputs(rng, 2))
    base = loss_from_arrays(**arrays, **SMALL)
    assert all(float(v) > 0 for v in base)
    # Both embeddings are L2-normalised per pixel: positive per-pixel scales change nothing.
    scale_s = jnp.asarray(rng.uniform(0.1, 10, (2, *FEAT_HW, 1)), jnp.float32)
    scale_t = jnp.asarray(rng.uniform(0.1, 10, (2, *FEAT_HW, 1)), jnp.float32)
    scaled = loss_from_arrays(**{**arrays, "student_embed": arrays["student_embed"] * scale_s,
                                 "teacher_embed": arrays["teacher_embed"] * scale_t}, **SMALL)
    for got, want in zip(scaled, base):
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_depends_on_the_key_only_through_the_contrast_slots():
    inputs = make_inputs(np.random.default_rng(6), 2)
    arrays = to_jax(inputs)
    first = loss_from_arrays(**arrays, **SMALL)
    again = loss_from_arrays(**arrays, **SMALL)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    other = loss_from_arrays(**{**arrays, "seed": arrays["seed"] + 1}, **SMALL)
    assert float(other[0]) != float(first[0])
    # With every pixel slot in the set (the default pixel_contrast for this tiny queue), the sample
    # order cannot matter: the key has no effect on the pixel loss.
    full = [loss_from_arrays(**{**arrays, "seed": jnp.int32(s)}, region_contrast=0)[0]
            for s in range(3)]
    for value in full[1:]:
        np.testing.assert_allclose(float(value), float(full[0]), rtol=1e-5)


@pytest.mark.torch
def test_matches_pytorch_original_core():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    inputs = make_inputs(np.random.default_rng(7), 2)
    options = {"tau": 0.1, "kd_tau": 2.0, **SMALL}
    pixel_index, region_index = indices_for(inputs, **options)

    # The original's forward in NCHW float64, given the contrast slots.
    s = F.normalize(torch.from_numpy(inputs["student_embed"]).permute(0, 3, 1, 2), p=2, dim=1)
    t = F.normalize(torch.from_numpy(inputs["teacher_embed"]).permute(0, 3, 1, 2), p=2, dim=1)
    labels = torch.from_numpy(inputs["labels"]).unsqueeze(1).double()
    labels = F.interpolate(labels, (s.shape[2], s.shape[3]), mode="nearest").squeeze(1).long()
    keep = (labels != IGNORE).reshape(-1)
    s = s.permute(0, 2, 3, 1).reshape(-1, C)[keep]
    t = t.permute(0, 2, 3, 1).reshape(-1, C)[keep]
    losses = []
    for queue, index in (("pixel_queue", pixel_index), ("region_queue", region_index)):
        q = torch.from_numpy(inputs[queue])[:, torch.from_numpy(np.array(index)).long()]
        q = q.reshape(-1, C)
        s_logits = torch.mm(s, q.T) / options["tau"]
        t_logits = torch.mm(t, q.T) / options["tau"]
        log_p_s = F.log_softmax(s_logits / options["kd_tau"], dim=1)
        p_t = F.softmax(t_logits / options["kd_tau"], dim=1)
        losses.append(F.kl_div(log_p_s, p_t, reduction="batchmean") * options["kd_tau"]**2)

    arrays = to_jax({k: v for k, v in inputs.items() if k != "mask"})
    got = loss_from_arrays(**arrays, **options)
    for g, want in zip(got, losses):
        np.testing.assert_allclose(float(g), want.item(), rtol=1e-5)


def test_gradient_costs_one_product_per_contrast_set_beyond_the_similarities():
    # Two similarity products per set (student and teacher); the gradient adds one per set,
    # formed beside them, and the value alone does not form it.
    arrays = to_jax({k: v for k, v in make_inputs(np.random.default_rng(3), 2).items()
                     if k != "mask"})
    student = arrays.pop("student_embed")

    def loss(s):
        return sum(loss_from_arrays(s, **arrays, **SMALL))

    assert dot_count(loss, student) == 4
    assert dot_count(jax.value_and_grad(loss), student) == 6


def test_bad_input_raises():
    arrays = to_jax(make_inputs(np.random.default_rng(8), 2))
    memory = memory_of(arrays)
    s, t, labels, key = arrays["student_embed"], arrays["teacher_embed"], arrays["labels"], \
        jax.random.key(0)
    with pytest.raises(ValueError, match="same shape"):
        cirkd_memory(s[..., :3], t, labels, memory, key)
    with pytest.raises(ValueError, match="student_embed must have rank 4"):
        cirkd_memory(s[0], t[0], labels, memory, key)
    with pytest.raises(ValueError, match="labels must have rank 3"):
        cirkd_memory(s, t, labels[0], memory, key)
    with pytest.raises(ValueError, match="same batch size"):
        cirkd_memory(s, t, labels[:1], memory, key)
    with pytest.raises(ValueError, match="integers"):
        cirkd_memory(s, t, labels.astype(jnp.float32), memory, key)
    with pytest.raises(ValueError, match="channels"):
        cirkd_memory(s[..., :3], t[..., :3], labels, memory, key)
    with pytest.raises(ValueError, match="mask"):
        cirkd_memory(s, t, labels, memory, key, mask=arrays["mask"][0])
    with pytest.raises(ValueError, match="tau"):
        cirkd_memory(s, t, labels, memory, key, tau=0.0)
    with pytest.raises(ValueError, match="kd_tau"):
        cirkd_memory(s, t, labels, memory, key, kd_tau=-1.0)
    with pytest.raises(ValueError, match="pixel_contrast"):
        cirkd_memory(s, t, labels, memory, key, pixel_contrast=-1)
    with pytest.raises(ValueError, match="memory.pixel_ptr"):
        cirkd_memory(s, t, labels, memory._replace(pixel_ptr=memory.pixel_ptr[:2]), key)
    with pytest.raises(ValueError, match="memory.pixel_queue and memory.region_queue"):
        cirkd_memory(s, t, labels, memory._replace(region_queue=memory.region_queue[:2]), key)
    with pytest.raises(ValueError, match="CirkdMemory"):
        cirkd_memory(s, t, labels, tuple(memory), key)


# ----------------------------------------------------------------------------------------------
# Memory: initialisation and update


def test_init_gives_unit_rows_and_zero_pointers():
    memory = init_cirkd_memory(jax.random.key(0), K, C, pixel_size=S_PIX, region_size=S_REG)
    assert memory.pixel_queue.shape == (K, S_PIX, C) and memory.pixel_queue.dtype == jnp.float32
    assert memory.region_queue.shape == (K, S_REG, C) and memory.region_queue.dtype == jnp.float32
    for ptr in (memory.pixel_ptr, memory.region_ptr):
        assert ptr.shape == (K,) and ptr.dtype == jnp.int32 and not np.any(np.asarray(ptr))
    for queue in (memory.pixel_queue, memory.region_queue):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(queue), axis=-1), 1.0, rtol=1e-6)
    # Random (not constant) rows, reproducible from the key.
    assert np.std(np.asarray(memory.pixel_queue)[..., 0]) > 0.1
    again = init_cirkd_memory(jax.random.key(0), K, C, pixel_size=S_PIX, region_size=S_REG)
    np.testing.assert_array_equal(np.asarray(again.pixel_queue), np.asarray(memory.pixel_queue))
    default = jax.eval_shape(lambda: init_cirkd_memory(jax.random.key(0), 19, 8))
    assert default.pixel_queue.shape == (19, 20000, 8)
    assert default.region_queue.shape == (19, 2000, 8)
    with pytest.raises(ValueError, match="num_classes"):
        init_cirkd_memory(jax.random.key(0), 0, C)
    with pytest.raises(ValueError, match="pixel_size"):
        init_cirkd_memory(jax.random.key(0), K, C, pixel_size=2.5)


def update_and_positions(memory, teacher_feat, labels, key, pixels_per_class, pixel_pool):
    """The public update's result and the pixel positions it drew (same compiled code)."""
    count = cm._check_update(memory, teacher_feat, labels, pixels_per_class, pixel_pool)
    flat_labels = cm._flat_labels(labels, *teacher_feat.shape[1:3], K, IGNORE)
    return cm._update(memory, teacher_feat, flat_labels, key, count=count, pixel_pool=pixel_pool)


def random_memory(rng, pixel_ptr=None, region_ptr=None):
    return CirkdMemory(
        jnp.asarray(unit_rows(rng, (K, S_PIX, C)), jnp.float32),
        jnp.asarray(rng.integers(0, S_PIX, K) if pixel_ptr is None else pixel_ptr, jnp.int32),
        jnp.asarray(unit_rows(rng, (K, S_REG, C)), jnp.float32),
        jnp.asarray(rng.integers(0, S_REG, K) if region_ptr is None else region_ptr, jnp.int32))


def assert_memory_close(got, want):
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        if np.issubdtype(g.dtype, np.integer):
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pixel_pool, pixels_per_class",
                         [("first_n", 2), ("class", 5), ("first_n", 12)])
def test_update_matches_original_loop(pixel_pool, pixels_per_class):
    rng = np.random.default_rng(9)
    # Pointers near the ends so the steps below wrap both queues; class 2 never appears.
    memory = random_memory(rng, pixel_ptr=[9, 0, 11], region_ptr=[5, 4, 0])
    state = memory_np = tuple(np.asarray(x) for x in memory)
    for step in range(3):
        teacher_feat = jnp.asarray(rng.normal(size=(2, *FEAT_HW, C)), jnp.float32)
        labels = jnp.asarray(make_labels(rng, 2, classes=(0, 1, IGNORE)))
        key = jax.random.key(step)
        public = update_cirkd_memory(memory, teacher_feat, labels, key,
                                     pixels_per_class=pixels_per_class, pixel_pool=pixel_pool)
        memory, positions = update_and_positions(memory, teacher_feat, labels, key,
                                                 pixels_per_class, pixel_pool)
        for a, b in zip(public, memory):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        state = cirkd_memory_ref.enqueue(*state, np.asarray(teacher_feat), np.asarray(labels),
                                         np.asarray(positions), pixels_per_class=pixels_per_class)
        assert_memory_close(memory, state)
    # The absent class kept its rows and pointers.
    for got, before in zip(memory, memory_np):
        np.testing.assert_array_equal(np.asarray(got)[2], before[2])
    assert memory.pixel_queue.dtype == jnp.float32 and memory.pixel_ptr.dtype == jnp.int32


def test_update_wrap_around_rules():
    # One image: 6 pixels of class 0, none of class 1, 4 of class 2 and 2 ignored pixels.
    labels = np.zeros((1, *FEAT_HW), np.int32)
    labels[0, 2, :] = [2, 2, 2, 2]
    labels[0, 0, :2] = IGNORE
    teacher_feat = jnp.asarray(np.random.default_rng(10).normal(size=(1, *FEAT_HW, C)), jnp.float32)
    rng = np.random.default_rng(11)
    for ptr0, (start0, next0) in {6: (6, 11), 7: (7, 0), 9: (7, 0), 0: (0, 5)}.items():
        memory = random_memory(rng, pixel_ptr=[ptr0, 3, 9], region_ptr=[5, 2, 3])
        new = update_cirkd_memory(memory, teacher_feat, jnp.asarray(labels), jax.random.key(0),
                                  pixels_per_class=5)
        changed = np.any(np.asarray(new.pixel_queue) != np.asarray(memory.pixel_queue), axis=-1)
        # class 0: 6 pixels → 5 rows at [ptr, ptr + 5), or in the last 5 slots with the pointer
        # reset to 0 once ptr + 5 >= 12 (also when they would just fit).
        assert np.flatnonzero(changed[0]).tolist() == list(range(start0, start0 + 5))
        # class 1 absent; class 2: 4 pixels → 4 rows at 9..12 do not fit: the last 4 slots.
        assert not changed[1].any()
        assert np.flatnonzero(changed[2]).tolist() == [8, 9, 10, 11]
        np.testing.assert_array_equal(np.asarray(new.pixel_ptr), [next0, 3, 0])
        # Region pointer wraps 5 → 0 for class 0; absent class 1 stays; class 2 moves on.
        np.testing.assert_array_equal(np.asarray(new.region_ptr), [0, 2, 4])
        region_changed = np.any(np.asarray(new.region_queue) != np.asarray(memory.region_queue),
                                axis=-1)
        assert np.flatnonzero(region_changed[0]).tolist() == [5]
        assert not region_changed[1].any()
        assert np.flatnonzero(region_changed[2]).tolist() == [3]


def test_update_region_rows_are_normalised_class_means():
    labels = np.array([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]], np.int32)
    feat = np.random.default_rng(12).normal(size=(1, *FEAT_HW, C))
    memory = random_memory(np.random.default_rng(13), region_ptr=[1, 2, 3])
    new = update_cirkd_memory(memory, jnp.asarray(feat, jnp.float32), jnp.asarray(labels),
                              jax.random.key(0), pixels_per_class=5)
    unit = feat / np.linalg.norm(feat, axis=-1, keepdims=True)
    for c, slot in ((0, 1), (1, 2)):
        mean = unit[0][labels[0] == c].mean(axis=0)
        np.testing.assert_allclose(np.asarray(new.region_queue[c, slot]),
                                   mean / np.linalg.norm(mean), rtol=1e-5)


def test_select_pixels_draws_without_replacement_from_the_right_pool():
    labels = jnp.asarray([0, 1, 0, 2, 2, 0, -1, 0, 1, 0, 0, 0], jnp.int32)  # n_c = 7, 2, 2
    n_c = np.array([7, 2, 2])
    keys = jax.random.split(jax.random.key(14), 400)
    for pool in ("first_n", "class"):
        draw_all = jax.jit(jax.vmap(lambda k, pool=pool: cm._select_pixels(k, labels, K, 3, pool)))
        positions, taken = draw_all(keys)
        positions, taken = np.asarray(positions), np.asarray(taken)
        np.testing.assert_array_equal(taken, np.broadcast_to(np.minimum(n_c, 3), taken.shape))
        counts = np.zeros((K, labels.shape[0]))
        for draw, used in zip(positions, taken):
            for c in range(K):
                chosen = draw[c, :used[c]]
                assert len(set(chosen.tolist())) == used[c]
                if pool == "first_n":
                    assert np.all(chosen < n_c[c])  # the original's randperm(n_c) positions
                else:
                    assert np.all(np.asarray(labels)[chosen] == c)
                counts[c, chosen] += 1
        # Uniform over the pool: class 0 picks 3 of its 7 candidates, each with probability 3/7.
        pool_0 = np.arange(7) if pool == "first_n" else np.flatnonzero(np.asarray(labels) == 0)
        frequency = counts[0, pool_0] / len(keys)
        np.testing.assert_allclose(frequency, 3 / 7, atol=0.1)
        assert counts[0].sum() == 3 * len(keys)
    # Deterministic per key.
    a = cm._select_pixels(keys[0], labels, K, 3, "class")
    b = cm._select_pixels(keys[0], labels, K, 3, "class")
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_update_keeps_unit_rows_and_is_deterministic():
    rng = np.random.default_rng(15)
    memory = random_memory(rng)
    teacher_feat = jnp.asarray(rng.normal(0, 5, (2, *FEAT_HW, C)), jnp.float32)
    labels = jnp.asarray(make_labels(rng, 2))
    key = jax.random.key(1)
    eager = update_cirkd_memory(memory, teacher_feat, labels, key)
    again = update_cirkd_memory(memory, teacher_feat, labels, key)
    for a, b in zip(again, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = update_cirkd_memory(memory, teacher_feat, labels, jax.random.key(2))
    assert np.any(np.asarray(other.pixel_queue) != np.asarray(eager.pixel_queue))
    for queue in (eager.pixel_queue, eager.region_queue):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(queue), axis=-1), 1.0, rtol=1e-5)


def test_update_is_a_constant_for_gradients():
    rng = np.random.default_rng(16)
    memory = random_memory(rng)
    teacher_feat = jnp.asarray(rng.normal(size=(2, *FEAT_HW, C)), jnp.float32)
    labels = jnp.asarray(make_labels(rng, 2))

    def total(feat, queue):
        new = update_cirkd_memory(memory._replace(pixel_queue=queue), feat, labels,
                                  jax.random.key(0))
        return jnp.sum(new.pixel_queue) + jnp.sum(new.region_queue)

    g_feat, g_queue = jax.grad(total, argnums=(0, 1))(teacher_feat, memory.pixel_queue)
    assert not np.any(np.asarray(g_feat)) and not np.any(np.asarray(g_queue))


def test_update_bf16_teacher_gives_float32_close_to_float32():
    rng = np.random.default_rng(17)
    memory = random_memory(rng)
    teacher_feat = rng.normal(size=(2, *FEAT_HW, C))
    labels = jnp.asarray(make_labels(rng, 2))
    full = update_cirkd_memory(memory, jnp.asarray(teacher_feat, jnp.float32), labels,
                               jax.random.key(0))
    half = update_cirkd_memory(memory, jnp.asarray(teacher_feat, jnp.bfloat16), labels,
                               jax.random.key(0))
    assert half.pixel_queue.dtype == jnp.float32 and half.region_queue.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(half.pixel_ptr), np.asarray(full.pixel_ptr))
    np.testing.assert_allclose(np.asarray(half.pixel_queue), np.asarray(full.pixel_queue),
                               atol=2e-2)
    np.testing.assert_allclose(np.asarray(half.region_queue), np.asarray(full.region_queue),
                               atol=2e-2)


def test_update_sharded_batch_matches_single_device():
    devices = np.array(jax.devices())
    if devices.size < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = Mesh(devices[:8], ("data",))
    rng = np.random.default_rng(18)
    memory = random_memory(rng)
    teacher_feat = jnp.asarray(rng.normal(size=(8, *FEAT_HW, C)), jnp.float32)
    labels = jnp.asarray(make_labels(rng, 8))
    expected = update_cirkd_memory(memory, teacher_feat, labels, jax.random.key(3))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    got = jax.jit(update_cirkd_memory)(jax.device_put(memory, replicated),
                                       jax.device_put(teacher_feat, batch),
                                       jax.device_put(labels, batch), jax.random.key(3))
    assert_memory_close(got, [np.asarray(x) for x in expected])


def test_train_step_enqueues_then_samples_under_jit():
    rng = np.random.default_rng(19)
    memory = init_cirkd_memory(jax.random.key(0), K, C, pixel_size=S_PIX, region_size=S_REG)
    arrays = to_jax(make_inputs(rng, 2))
    arrays["labels"] = jnp.asarray(np.tile([0, 1, 2, IGNORE], (2, 6, 2)), jnp.int32)  # all classes

    @jax.jit
    def step(memory, student, teacher, labels, key):
        key_update, key_loss = jax.random.split(key)
        memory = update_cirkd_memory(memory, teacher, labels, key_update)
        loss, grad = jax.value_and_grad(
            lambda s: sum(cirkd_memory(s, teacher, labels, memory, key_loss)))(student)
        return memory, loss, grad

    for i in range(3):
        before = memory
        memory, loss, grad = step(memory, arrays["student_embed"], arrays["teacher_embed"],
                                  arrays["labels"], jax.random.key(i))
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
        # The update inside the jitted step equals the eager update; the loss saw the new memory.
        key_update, key_loss = jax.random.split(jax.random.key(i))
        eager = update_cirkd_memory(before, arrays["teacher_embed"], arrays["labels"], key_update)
        assert_memory_close(memory, [np.asarray(x) for x in eager])
        want = cirkd_memory(arrays["student_embed"], arrays["teacher_embed"], arrays["labels"],
                            eager, key_loss)
        np.testing.assert_allclose(float(loss), float(sum(want)), rtol=1e-5)
    assert np.all(np.asarray(memory.region_ptr) == 3 * 2 % S_REG)  # every class in both images


def test_update_bad_input_raises():
    rng = np.random.default_rng(20)
    memory = random_memory(rng)
    feat = jnp.asarray(rng.normal(size=(2, *FEAT_HW, C)), jnp.float32)
    labels = jnp.asarray(make_labels(rng, 2))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="teacher_feat must have rank 4"):
        update_cirkd_memory(memory, feat[0], labels, key)
    with pytest.raises(ValueError, match="channels"):
        update_cirkd_memory(memory, feat[..., :2], labels, key)
    with pytest.raises(ValueError, match="same batch size"):
        update_cirkd_memory(memory, feat, labels[:1], key)
    with pytest.raises(ValueError, match="pixel_pool"):
        update_cirkd_memory(memory, feat, labels, key, pixel_pool="random")
    with pytest.raises(ValueError, match="pixels_per_class"):
        update_cirkd_memory(memory, feat, labels, key, pixels_per_class=0)
    # 13 > 12 slots: only an error where a class could hold 13 pixels (4x4 map, not 3x4).
    update_cirkd_memory(memory, feat, labels, key, pixels_per_class=S_PIX + 1)
    big = jnp.asarray(rng.normal(size=(2, 4, 4, C)), jnp.float32)
    with pytest.raises(ValueError, match="pixels_per_class"):
        update_cirkd_memory(memory, big, labels, key, pixels_per_class=S_PIX + 1)
    with pytest.raises(ValueError, match="memory.region_ptr"):
        update_cirkd_memory(memory._replace(region_ptr=jnp.zeros((K, 1), jnp.int32)), feat, labels,
                            key)
