"""Offline memory plan: placement, metadata, and TFLite Micro's measured arena."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import _tflite, memory_plan, runtimes


def _info(sizes, ops):
    """A ModelInfo with int8 tensors of `sizes` bytes and `(name, ins, outs)` ops."""
    tensors = [
        _tflite.TensorInfo(i, "", "int8", (1, s), False) for i, s in enumerate(sizes)
    ]
    return _tflite.ModelInfo(
        size_bytes=0,
        op_sequence=ops,
        tensors=tensors,
        inputs=[0],
        outputs=[len(sizes) - 1],
        num_subgraphs=1,
        has_signatures=False,
        metadata=[],
    )


def _chain(sizes):
    ops = [("CONV_2D", [i], [i + 1]) for i in range(len(sizes) - 1)]
    return _info(sizes, ops)


def test_chain_plan_reaches_the_liveness_bound_where_greedy_does_not():
    # Largest-first placement puts the last tensor at 0, the 64 above it, and
    # then the second 48 fits under neither: 192 bytes where 144 suffice.
    info = _chain([48, 48, 64, 80])
    plan = memory_plan.compute(info)
    assert plan.lower_bound == _tflite.activation_lower_bound(info) == 144
    assert plan.greedy_bytes == 192
    assert plan.arena_bytes == plan.lower_bound
    memory_plan.check(info, plan.offsets)
    assert all(o % 16 == 0 for o in plan.offsets)


def test_reshape_output_shares_its_input_buffer():
    ops = [
        ("CONV_2D", [0], [1]),
        ("RESHAPE", [1], [2]),
        ("FULLY_CONNECTED", [2], [3]),
    ]
    info = _info([32, 64, 64, 16], ops)
    bufs, owner = memory_plan.buffers(info)
    assert owner[1] == owner[2] and len(bufs) == 3
    plan = memory_plan.compute(info)
    assert plan.offsets[1] == plan.offsets[2]
    assert plan.arena_bytes == 96  # Not 128: the reshape copies nothing.


def test_check_rejects_overlapping_live_tensors():
    info = _chain([64, 64, 64])
    with pytest.raises(ValueError, match="overlap in time and memory"):
        memory_plan.check(info, [0, 0, 64])
    with pytest.raises(ValueError, match="invalid offset 8"):
        memory_plan.check(info, [8, 80, 0])


def _chain_model():
    layers = keras.layers
    inputs = keras.Input((24, 24, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    for filters, stride in ((16, 1), (32, 2), (32, 1), (64, 2)):
        x = layers.DepthwiseConv2D(3, stride, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 1, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, activation="softmax")(x))


@pytest.fixture(scope="module")
def planned():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 24, 24, 3)).astype("float32")
    return kmt.convert(_chain_model(), "mcu", representative_data=x, verbose=0)


def test_convert_embeds_a_plan_that_lowers_the_measured_arena(planned):
    mem = planned.report["memory"]
    assert mem["offline_plan"] is True
    assert planned.arena_bytes < mem["arena_bytes_without_plan"]
    assert mem["head_bytes"] == mem["offline_plan_bytes"]
    assert mem["head_bytes"] <= mem["activation_lower_bound_bytes"] + 16
    info = _tflite.parse(planned.tflite)
    assert info.metadata == [memory_plan.METADATA_NAME]
    offsets = memory_plan.read(planned.tflite)
    assert len(offsets) == len(info.tensors)
    memory_plan.check(info, offsets)
    assert planned.parity["tflm_matches_litert"] and planned.report["verified"]
    assert "offline memory plan" in planned.files()["report.md"].decode()


def test_plan_leaves_outputs_bit_identical_and_survives_strip(planned):
    info = _tflite.parse(planned.tflite)
    without = _tflite.strip(memory_plan.embed(planned.tflite, [-1] * len(info.tensors)))
    assert memory_plan.read(_tflite.strip(planned.tflite)) is not None
    xs = memory_plan._random_inputs(info, samples=4, seed=1)
    a = runtimes.tflm_run(planned.tflite, xs, planned.arena_bytes)
    b = runtimes.tflm_run(
        without, xs, planned.report["memory"]["arena_bytes_without_plan"]
    )
    assert np.array_equal(a[0], b[0])
    with pytest.raises(runtimes.RuntimeFailure, match="TFLite Micro failed"):
        runtimes.tflm_run(planned.tflite, xs, planned.arena_bytes - 16)


def test_no_plan_when_tflite_micro_already_reaches_the_bound():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    mem = result.report["memory"]
    assert mem["offline_plan"] is False and "arena_bytes_without_plan" not in mem
    assert memory_plan.read(result.tflite) is None
