import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.losses.contract import (LossCase, LossContract, assert_matches_reference,
                                   relative_error, to_jax)
from tests.references import cirkd_channel_ref

cc = importlib.import_module("kdjax.losses.cirkd_channel")
CirkdChannelMemory = cc.CirkdChannelMemory

C = 5                # channels
HW = (3, 4)          # pooled size: P' = 12 positions
P = HW[0] * HW[1]
S = 20               # queue slots
SMALL = {"channel_contrast": 8}


def unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_pair(rng, batch):
    shape = (batch, *HW, C)
    return {
        "student_embed": rng.normal(0, 1, shape),
        "teacher_embed": rng.normal(0, 1, shape),
        "mask": rng.random(shape[:3]) > 0.2,
    }


def make_memory_inputs(rng, batch):
    return {
        **make_pair(rng, batch),
        "queue": unit_rows(rng, (S, P)),
        "ptr": np.array(rng.integers(0, S), np.int32),
        "seed": np.array(rng.integers(0, 2**16), np.int32),
    }


def memory_loss(student_embed, teacher_embed, queue, ptr, seed, mask=None, **options):
    memory = CirkdChannelMemory(queue, ptr)
    return cc.cirkd_channel_memory(student_embed, teacher_embed, memory, jax.random.key(seed),
                                   mask=mask, **options)


def same_teacher(inputs):
    return {**inputs, "teacher_embed": inputs["student_embed"].copy()}


NOT_BATCHED = {name: None for name in ("queue", "ptr", "seed")}


class TestMinibatchContract(LossContract):
    case = LossCase(loss=cc.cirkd_channel_minibatch, make_inputs=make_pair,
                    student=("student_embed",), teacher=("teacher_embed",),
                    options={"group_size": 2}, identical=same_teacher)


class TestMinibatchBlocksContract(LossContract):
    case = LossCase(loss=cc.cirkd_channel_minibatch, make_inputs=make_pair,
                    student=("student_embed",), teacher=("teacher_embed",),
                    options={"group_size": None, "block_size": 2}, identical=same_teacher)


class TestMseContract(LossContract):
    case = LossCase(loss=cc.cirkd_channel_mse, make_inputs=make_pair, student=("student_embed",),
                    teacher=("teacher_embed",), identical=same_teacher)


class TestMemoryContract(LossContract):
    case = LossCase(loss=memory_loss, make_inputs=make_memory_inputs, student=("student_embed",),
                    teacher=("teacher_embed", "queue"), options=SMALL, identical=same_teacher,
                    batch_axis=NOT_BATCHED)


# ----------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference.

def with_empty_image(inputs, image=1):
    inputs["mask"][image] = False
    return inputs


@pytest.mark.parametrize("batch, options, masked", [
    (2, {"tau": 0.1, "group_size": 2}, False),
    (4, {"tau": 0.1, "group_size": 2}, True),
    (4, {"tau": 0.5, "group_size": None, "block_size": 2}, False),
    (4, {"tau": 0.2, "group_size": 1}, True),
    (3, {"tau": 0.1, "group_size": 3, "block_size": 3}, "empty_image"),
])
def test_minibatch_matches_reference(batch, options, masked):
    inputs = make_pair(np.random.default_rng(1), batch)
    if masked == "empty_image":
        with_empty_image(inputs)
    elif not masked:
        inputs.pop("mask")
    assert_matches_reference(cc.cirkd_channel_minibatch, cirkd_channel_ref.minibatch, inputs,
                             ("student_embed",), **options)


@pytest.mark.parametrize("masked", [False, True, "empty_image"])
def test_mse_matches_reference(masked):
    inputs = make_pair(np.random.default_rng(2), 3)
    if masked == "empty_image":
        with_empty_image(inputs, 0)
    elif not masked:
        inputs.pop("mask")
    assert_matches_reference(cc.cirkd_channel_mse, cirkd_channel_ref.mse, inputs,
                             ("student_embed",))


def contrast_slots(inputs, channel_contrast=2048):
    return cc._contrast_slots(jax.random.key(int(inputs["seed"])), S, channel_contrast)


def memory_reference(index):
    def reference(student_embed, teacher_embed, queue, ptr=None, seed=None, mask=None,
                  **options):
        options = {k: v for k, v in options.items() if k in ("tau", "kd_tau")}
        return cirkd_channel_ref.memory(student_embed, teacher_embed, queue, np.asarray(index),
                                        mask=mask, **options)

    return reference


@pytest.mark.parametrize("options, masked", [
    ({"tau": 0.1, "kd_tau": 1.0, **SMALL}, False),
    ({"tau": 0.1, "kd_tau": 1.0, **SMALL}, True),
    # more contrast rows than the queue holds: every row, in a random order
    ({"tau": 0.2, "kd_tau": 4.0}, "empty_image"),
    ({"tau": 0.5, "kd_tau": 2.0, "channel_contrast": 1}, False),
])
def test_memory_matches_reference(options, masked):
    inputs = make_memory_inputs(np.random.default_rng(3), 2)
    if masked == "empty_image":
        with_empty_image(inputs)
    elif not masked:
        inputs.pop("mask")
    index = contrast_slots(inputs, options.get("channel_contrast", 2048))
    assert_matches_reference(memory_loss, memory_reference(index), inputs, ("student_embed",),
                             **options)


def test_memory_rows_in_blocks_with_a_padded_last_block_match_reference():
    # 2 images × 5 channels = 10 anchor rows in blocks of 4: the last block has 2 padded rows.
    inputs = make_memory_inputs(np.random.default_rng(4), 2)
    index = contrast_slots(inputs, SMALL["channel_contrast"])
    cm = importlib.import_module("kdjax.losses.cirkd_memory")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cm, "_ROWS_PER_STEP", 4)
            jax.clear_caches()  # the row count is read when the jitted loss is traced
            assert_matches_reference(memory_loss, memory_reference(index), inputs,
                                     ("student_embed",), **SMALL)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("pool, size", [(4, (10, 13)), (4, (8, 8)), ((2, 3), (5, 7)), (1, (3, 4))])
def test_pool_matches_reference(pool, size):
    x = np.random.default_rng(5).normal(size=(2, *size, C))
    window = (pool, pool) if isinstance(pool, int) else pool
    got = cc.cirkd_channel_pool(jnp.asarray(x, jnp.float32), pool=pool)
    want = cirkd_channel_ref.avg_pool_ceil(x, window)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert cc.cirkd_channel_pool(jnp.asarray(x, jnp.bfloat16), pool=pool).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# Properties.

def test_nonnegative_and_invariant_to_channel_scale():
    rng = np.random.default_rng(6)
    arrays = to_jax(make_memory_inputs(rng, 2))
    arrays.pop("mask")
    # Every channel map is L2-normalised over the positions: a positive scale per image and
    # channel changes nothing.
    scale_s = jnp.asarray(rng.uniform(0.1, 10, (2, 1, 1, C)), jnp.float32)
    scale_t = jnp.asarray(rng.uniform(0.1, 10, (2, 1, 1, C)), jnp.float32)
    scaled = {**arrays, "student_embed": arrays["student_embed"] * scale_s,
              "teacher_embed": arrays["teacher_embed"] * scale_t}
    pair = ("student_embed", "teacher_embed")
    losses = [
        lambda a: cc.cirkd_channel_minibatch(*(a[k] for k in pair), group_size=2),
        lambda a: cc.cirkd_channel_mse(*(a[k] for k in pair)),
        lambda a: memory_loss(**a, **SMALL),
    ]
    for loss in losses:
        base = float(loss(arrays))
        assert base > 0
        np.testing.assert_allclose(float(loss(scaled)), base, rtol=1e-5)


def test_mse_is_the_mean_cosine_gap_within_its_bounds():
    rng = np.random.default_rng(7)
    s, t = (jnp.asarray(rng.normal(size=(2, *HW, C)), jnp.float32) for _ in range(2))
    value = float(cc.cirkd_channel_mse(s, t))
    e_s, e_t = (cirkd_channel_ref.embeddings(np.asarray(x)) for x in (s, t))
    cosine = np.sum(e_s * e_t, axis=-1)
    np.testing.assert_allclose(value, np.mean(2 - 2 * cosine) / P, rtol=1e-5)
    assert 0 <= value <= 4 / P
    # The largest value: every student channel the negated teacher's.
    np.testing.assert_allclose(float(cc.cirkd_channel_mse(-t, t)), 4 / P, rtol=1e-5)


def test_minibatch_groups():
    arrays = to_jax(make_pair(np.random.default_rng(8), 4))
    s, t = arrays["student_embed"], arrays["teacher_embed"]
    # One image per group (the Cityscapes scripts: one image per GPU): the self-pairs only.
    singles = np.mean([float(cc.cirkd_channel_minibatch(s[i:i + 1], t[i:i + 1], group_size=None))
                       for i in range(4)])
    np.testing.assert_allclose(float(cc.cirkd_channel_minibatch(s, t, group_size=1)), singles,
                               rtol=1e-5)
    pairs = np.mean([float(cc.cirkd_channel_minibatch(s[g:g + 2], t[g:g + 2], group_size=None))
                     for g in (0, 2)])
    np.testing.assert_allclose(float(cc.cirkd_channel_minibatch(s, t, group_size=2)), pairs,
                               rtol=1e-5)
    assert float(cc.cirkd_channel_minibatch(s, t, group_size=None)) != pytest.approx(pairs)
    # Dense and blocked forms agree.
    np.testing.assert_allclose(float(cc.cirkd_channel_minibatch(s, t, block_size=3)),
                               float(cc.cirkd_channel_minibatch(s, t)), rtol=1e-5)


def test_an_image_without_valid_positions_leaves_every_loss():
    inputs = make_memory_inputs(np.random.default_rng(9), 3)
    inputs["mask"][:] = True
    inputs["mask"][1] = False
    arrays = to_jax(inputs)
    kept = {**arrays, "student_embed": arrays["student_embed"][::2],
            "teacher_embed": arrays["teacher_embed"][::2], "mask": None}
    for loss in (lambda a: cc.cirkd_channel_minibatch(a["student_embed"], a["teacher_embed"],
                                                      group_size=None, mask=a["mask"]),
                 lambda a: cc.cirkd_channel_mse(a["student_embed"], a["teacher_embed"],
                                                mask=a["mask"]),
                 lambda a: memory_loss(**a, **SMALL)):
        np.testing.assert_allclose(float(loss(arrays)), float(loss(kept)), rtol=1e-5)


def test_memory_depends_on_the_key_only_through_the_contrast_slots():
    arrays = to_jax(make_memory_inputs(np.random.default_rng(10), 2))
    first = float(memory_loss(**arrays, **SMALL))
    assert float(memory_loss(**arrays, **SMALL)) == first
    assert float(memory_loss(**{**arrays, "seed": arrays["seed"] + 1}, **SMALL)) != first
    # With every queue row in the set, the draw's order cannot matter.
    full = [float(memory_loss(**{**arrays, "seed": jnp.int32(s)})) for s in range(3)]
    np.testing.assert_allclose(full[1:], full[0], rtol=1e-5)


def test_contrast_slots_are_a_random_subset():
    key = jax.random.key(3)
    slots = np.asarray(cc._contrast_slots(key, S, 8))
    assert slots.dtype == np.int32 and slots.shape == (8,)
    assert len(set(slots.tolist())) == 8 and np.all((slots >= 0) & (slots < S))
    np.testing.assert_array_equal(np.asarray(cc._contrast_slots(key, S, 8)), slots)
    assert sorted(np.asarray(cc._contrast_slots(key, S, 2048)).tolist()) == list(range(S))
    draws = {tuple(np.asarray(cc._contrast_slots(jax.random.key(s), S, 8))) for s in range(10)}
    assert len(draws) > 1


# ----------------------------------------------------------------------------------------------
# The memory: initialisation and update.

def test_init_gives_unit_rows_and_a_zero_pointer():
    memory = cc.init_cirkd_channel_memory(jax.random.key(0), P, size=S)
    assert memory.queue.shape == (S, P) and memory.queue.dtype == jnp.float32
    assert memory.ptr.shape == () and memory.ptr.dtype == jnp.int32 and int(memory.ptr) == 0
    np.testing.assert_allclose(np.linalg.norm(np.asarray(memory.queue), axis=-1), 1.0, rtol=1e-6)
    assert np.std(np.asarray(memory.queue)[:, 0]) > 0.1
    again = cc.init_cirkd_channel_memory(jax.random.key(0), P, size=S)
    np.testing.assert_array_equal(np.asarray(again.queue), np.asarray(memory.queue))
    default = jax.eval_shape(lambda: cc.init_cirkd_channel_memory(jax.random.key(0), 512))
    assert default.queue.shape == (10000, 512)
    with pytest.raises(ValueError, match="dim"):
        cc.init_cirkd_channel_memory(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="size"):
        cc.init_cirkd_channel_memory(jax.random.key(0), P, size=2.5)


def random_memory(rng, ptr):
    return CirkdChannelMemory(jnp.asarray(unit_rows(rng, (S, P)), jnp.float32),
                              jnp.asarray(ptr, jnp.int32))


def update_and_order(memory, teacher, key, channels_per_step=256, mask=None):
    """The public update's result and the rows it drew (same compiled code)."""
    count = cc._check_update(memory, teacher, channels_per_step, mask)
    return cc._update(memory, teacher, key, mask, count=count)


@pytest.mark.parametrize("channels_per_step, masked", [(7, False), (256, False), (4, True),
                                                       (9, "empty_image")])
def test_update_matches_original_loop(channels_per_step, masked):
    rng = np.random.default_rng(11)
    memory = random_memory(rng, 3)
    state = (np.asarray(memory.queue), int(memory.ptr))
    for step in range(4):
        inputs = make_pair(rng, 2)
        mask = None
        if masked:
            mask = with_empty_image(inputs)["mask"] if masked == "empty_image" else inputs["mask"]
        teacher = jnp.asarray(inputs["teacher_embed"], jnp.float32)
        mask_j = None if mask is None else jnp.asarray(mask)
        key = jax.random.key(step)
        public = cc.update_cirkd_channel_memory(memory, teacher, key,
                                                channels_per_step=channels_per_step, mask=mask_j)
        memory, order = update_and_order(memory, teacher, key, channels_per_step, mask_j)
        for a, b in zip(public, memory):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        rows = 2 * C if masked != "empty_image" else C
        taken = min(rows, channels_per_step)
        order = np.asarray(order)
        assert len(set(order[:taken].tolist())) == taken
        if masked == "empty_image":
            assert np.all(order[:taken] < C)  # image 1 has no valid position: none of its rows
        state = cirkd_channel_ref.enqueue(*state, inputs["teacher_embed"], order, taken, mask=mask)
        np.testing.assert_allclose(np.asarray(memory.queue), state[0], rtol=1e-5, atol=1e-6)
        assert int(memory.ptr) == state[1]
    assert memory.queue.dtype == jnp.float32 and memory.ptr.dtype == jnp.int32


def test_update_pointer_and_wrap_rules():
    teacher = jnp.asarray(np.random.default_rng(12).normal(size=(2, *HW, C)), jnp.float32)
    rng = np.random.default_rng(13)
    # 10 rows per step into 20 slots: at ptr + 10 >= 20 the last 10 slots and the pointer to 0,
    # also when they would just fit (ptr = 10).
    for ptr0, (start, ptr1) in {0: (0, 10), 3: (3, 13), 9: (9, 19), 10: (10, 0), 15: (10, 0),
                                19: (10, 0)}.items():
        memory = random_memory(rng, ptr0)
        new = cc.update_cirkd_channel_memory(memory, teacher, jax.random.key(0))
        changed = np.any(np.asarray(new.queue) != np.asarray(memory.queue), axis=-1)
        assert np.flatnonzero(changed).tolist() == list(range(start, start + 10))
        assert int(new.ptr) == ptr1
    # Fewer rows than channels_per_step: all of them, each once.
    memory = random_memory(rng, 0)
    new, order = update_and_order(memory, teacher, jax.random.key(1))
    assert sorted(np.asarray(order).tolist()) == list(range(2 * C))
    rows = cirkd_channel_ref.embeddings(np.asarray(teacher)).reshape(2 * C, P)
    np.testing.assert_allclose(np.asarray(new.queue[:10]), rows[np.asarray(order)], rtol=1e-5,
                               atol=1e-6)


def test_update_draws_rows_uniformly_without_replacement():
    teacher = jnp.asarray(np.random.default_rng(14).normal(size=(2, *HW, C)), jnp.float32)
    memory = random_memory(np.random.default_rng(15), 0)
    keys = jax.random.split(jax.random.key(16), 400)
    orders = jax.jit(jax.vmap(lambda k: update_and_order(memory, teacher, k, 3)[1]))(keys)
    orders = np.asarray(orders)
    assert all(len(set(o.tolist())) == 3 for o in orders)
    frequency = np.bincount(orders.reshape(-1), minlength=2 * C) / len(keys)
    np.testing.assert_allclose(frequency, 3 / (2 * C), atol=0.08)


def test_update_is_a_constant_for_gradients():
    rng = np.random.default_rng(17)
    memory = random_memory(rng, 5)
    teacher = jnp.asarray(rng.normal(size=(2, *HW, C)), jnp.float32)

    def total(feat, queue):
        new = cc.update_cirkd_channel_memory(memory._replace(queue=queue), feat,
                                             jax.random.key(0))
        return jnp.sum(new.queue)

    g_feat, g_queue = jax.grad(total, argnums=(0, 1))(teacher, memory.queue)
    assert not np.any(np.asarray(g_feat)) and not np.any(np.asarray(g_queue))


def test_update_bf16_teacher_gives_float32_close_to_float32():
    rng = np.random.default_rng(18)
    memory = random_memory(rng, 4)
    teacher = rng.normal(size=(2, *HW, C))
    full = cc.update_cirkd_channel_memory(memory, jnp.asarray(teacher, jnp.float32),
                                          jax.random.key(0))
    half = cc.update_cirkd_channel_memory(memory, jnp.asarray(teacher, jnp.bfloat16),
                                          jax.random.key(0))
    assert half.queue.dtype == jnp.float32 and int(half.ptr) == int(full.ptr)
    np.testing.assert_allclose(np.asarray(half.queue), np.asarray(full.queue), atol=2e-2)


def test_update_sharded_batch_matches_single_device():
    devices = np.array(jax.devices())
    if devices.size < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = Mesh(devices[:8], ("data",))
    rng = np.random.default_rng(19)
    memory = random_memory(rng, 6)
    teacher = jnp.asarray(rng.normal(size=(8, *HW, C)), jnp.float32)
    mask = jnp.asarray(rng.random((8, *HW)) > 0.2)
    expected = cc.update_cirkd_channel_memory(memory, teacher, jax.random.key(3),
                                              channels_per_step=13, mask=mask)
    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    update = jax.jit(lambda m, t, k, mk: cc.update_cirkd_channel_memory(
        m, t, k, channels_per_step=13, mask=mk))
    got = update(jax.device_put(memory, replicated), jax.device_put(teacher, batch),
                 jax.random.key(3), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(got.queue), np.asarray(expected.queue), rtol=1e-5,
                               atol=1e-6)
    assert int(got.ptr) == int(expected.ptr)


def test_train_step_enqueues_then_samples_under_jit():
    rng = np.random.default_rng(20)
    memory = cc.init_cirkd_channel_memory(jax.random.key(0), P, size=S)
    arrays = to_jax(make_pair(rng, 2))

    @jax.jit
    def step(memory, student, teacher, key):
        key_update, key_loss = jax.random.split(key)
        memory = cc.update_cirkd_channel_memory(memory, teacher, key_update,
                                                channels_per_step=6)
        loss, grad = jax.value_and_grad(
            lambda s: cc.cirkd_channel_memory(s, teacher, memory, key_loss, **SMALL))(student)
        return memory, loss, grad

    for i in range(4):
        before = memory
        memory, loss, grad = step(memory, arrays["student_embed"], arrays["teacher_embed"],
                                  jax.random.key(i))
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
        key_update, key_loss = jax.random.split(jax.random.key(i))
        eager = cc.update_cirkd_channel_memory(before, arrays["teacher_embed"], key_update,
                                               channels_per_step=6)
        np.testing.assert_allclose(np.asarray(memory.queue), np.asarray(eager.queue), rtol=1e-6)
        want = cc.cirkd_channel_memory(arrays["student_embed"], arrays["teacher_embed"], eager,
                                       key_loss, **SMALL)
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    assert int(memory.ptr) == 0  # 6, 12, 18 + 6 >= 20: the last slots, then back to 0


# ----------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input_raises():
    arrays = to_jax(make_memory_inputs(np.random.default_rng(21), 2))
    s, t, mask = arrays["student_embed"], arrays["teacher_embed"], arrays["mask"]
    memory, key = CirkdChannelMemory(arrays["queue"], arrays["ptr"]), jax.random.key(0)
    for loss in (cc.cirkd_channel_minibatch, cc.cirkd_channel_mse,
                 lambda a, b, **o: cc.cirkd_channel_memory(a, b, memory, key, **o)):
        with pytest.raises(ValueError, match="same shape"):
            loss(s[..., :3], t)
        with pytest.raises(ValueError, match="student_embed must have rank 4"):
            loss(s[0], t[0])
        with pytest.raises(ValueError, match="mask"):
            loss(s, t, mask=mask[0])
    with pytest.raises(ValueError, match="tau"):
        cc.cirkd_channel_minibatch(s, t, tau=0.0)
    with pytest.raises(ValueError, match="group_size"):
        cc.cirkd_channel_minibatch(s, t, group_size=3)
    with pytest.raises(ValueError, match="block_size"):
        cc.cirkd_channel_minibatch(s, t, block_size=0)
    with pytest.raises(ValueError, match="kd_tau"):
        cc.cirkd_channel_memory(s, t, memory, key, kd_tau=-1.0)
    with pytest.raises(ValueError, match="channel_contrast"):
        cc.cirkd_channel_memory(s, t, memory, key, channel_contrast=0)
    # The queue rows must have H'·W' entries: a clear message naming both and the remedy.
    wrong = cc.init_cirkd_channel_memory(key, 7, size=S)
    with pytest.raises(ValueError, match=r"H·W = 12 positions but the memory queue rows have 7"):
        cc.cirkd_channel_memory(s, t, wrong, key)
    with pytest.raises(ValueError, match="Initialise the memory with dim"):
        cc.update_cirkd_channel_memory(wrong, t, key)
    with pytest.raises(ValueError, match="memory.ptr must be a scalar"):
        cc.cirkd_channel_memory(s, t, memory._replace(ptr=jnp.zeros(1, jnp.int32)), key)
    with pytest.raises(ValueError, match="memory.queue must have rank 2"):
        cc.cirkd_channel_memory(s, t, memory._replace(queue=memory.queue[None]), key)
    with pytest.raises(ValueError, match="CirkdChannelMemory"):
        cc.cirkd_channel_memory(s, t, tuple(memory), key)
    with pytest.raises(ValueError, match="teacher_embed must have rank 4"):
        cc.update_cirkd_channel_memory(memory, t[0], key)
    with pytest.raises(ValueError, match="channels_per_step"):
        cc.update_cirkd_channel_memory(memory, t, key, channels_per_step=0)
    # 21 rows > 20 slots: an error only where the batch has that many rows (2·5 = 10 here).
    cc.update_cirkd_channel_memory(memory, t, key, channels_per_step=S + 1)
    with pytest.raises(ValueError, match="channels_per_step"):
        cc.update_cirkd_channel_memory(memory, jnp.concatenate([t, t, t]), key,
                                       channels_per_step=S + 1)
    with pytest.raises(ValueError, match="pool must be"):
        cc.cirkd_channel_pool(s, pool=0)
    with pytest.raises(ValueError, match="feat must have rank 4"):
        cc.cirkd_channel_pool(s[0])


# ----------------------------------------------------------------------------------------------
# PyTorch transcription of the original module.

@pytest.mark.torch
@pytest.mark.parametrize("projected", [False, True])
def test_matches_pytorch_transcription(projected):
    torch = pytest.importorskip("torch")
    reference = importlib.import_module("tests.torch_reference.cirkd_channel")
    rng = np.random.default_rng(22)
    c_s = 3 if projected else C
    # Raw head features of 10×13: pooled 4×4 in ceil mode to 3×4 (partial windows on both axes).
    raw_s = rng.normal(size=(2, 10, 13, c_s))
    raw_t = rng.normal(size=(2, 10, 13, C))
    weight = rng.normal(size=(c_s, C))
    queue = unit_rows(rng, (S, P))
    ptr, tau, kd_tau, contrast = 15, 0.1, 2.0, 8
    key_update, key_loss = jax.random.key(1), jax.random.key(2)

    def jax_losses(student_raw):
        s = cc.cirkd_channel_pool(student_raw)
        if projected:
            s = jnp.einsum("nhwc,cd->nhwd", s, jnp.asarray(weight, jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        t = cc.cirkd_channel_pool(jnp.asarray(raw_t, jnp.float32))
        memory = cc.update_cirkd_channel_memory(
            CirkdChannelMemory(jnp.asarray(queue, jnp.float32), jnp.int32(ptr)), t, key_update)
        return (cc.cirkd_channel_minibatch(s, t, tau=tau, group_size=None),
                cc.cirkd_channel_memory(s, t, memory, key_loss, tau=tau, kd_tau=kd_tau,
                                        channel_contrast=contrast),
                cc.cirkd_channel_mse(s, t), memory)

    student = jnp.asarray(raw_s, jnp.float32)
    *values, memory = jax_losses(student)
    teacher_pooled = cc.cirkd_channel_pool(jnp.asarray(raw_t, jnp.float32))
    _, order = update_and_order(
        CirkdChannelMemory(jnp.asarray(queue, jnp.float32), jnp.int32(ptr)), teacher_pooled,
        key_update)
    index = cc._contrast_slots(key_loss, S, contrast)

    feat_s = torch.from_numpy(raw_s).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    feat_t = torch.from_numpy(raw_t).permute(0, 3, 1, 2)
    project = None
    if projected:
        conv = torch.nn.Conv2d(c_s, C, 1, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight.T[:, :, None, None]))
        project = conv
    torch_queue = torch.from_numpy(queue.copy())
    *torch_values, torch_ptr = reference.channel_contrast(
        feat_s, feat_t, torch_queue, ptr, torch.from_numpy(np.array(order)).long(),
        torch.from_numpy(np.array(index)).long(), project=project, temperature=tau,
        kd_temperature=kd_tau)
    np.testing.assert_allclose(np.asarray(memory.queue), torch_queue.numpy(), rtol=1e-5,
                               atol=1e-6)
    assert int(memory.ptr) == torch_ptr == 0

    for i, (got, want) in enumerate(zip(values, torch_values, strict=True)):
        np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)
        feat_s.grad = None
        want.backward(retain_graph=True)
        want_grad = feat_s.grad.permute(0, 2, 3, 1).numpy()
        got_grad = jax.grad(lambda x, i=i: jax_losses(x)[i])(student)
        assert relative_error(got_grad, want_grad) < 1e-5, i
