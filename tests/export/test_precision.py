"""Mixed precision: int16x8 / float32 layers that TFLite Micro runs, and auto."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import _tflite, precision


def _conv_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="c3")(y)
    x = keras.layers.ReLU(name="r")(keras.layers.Add(name="add")([x, y]))
    x = keras.layers.Flatten(name="fl")(x)
    out = keras.layers.Dense(3, activation="softmax", name="d")(x)
    return keras.Model(inp, out, name="mixed")


def _outlier_model():
    """Dense `a` has one output unit 200x larger than the others: per-tensor
    int8 crushes the small units, which `b` reads. int16 there recovers."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, activation="relu", name="a"),
            keras.layers.Dense(64, activation="relu", name="b"),
            keras.layers.Dense(4, name="c"),
        ],
        name="outlier",
    )
    kernel, bias = model.get_layer("a").get_weights()
    kernel[:, 0] *= 200
    model.get_layer("a").set_weights([kernel, bias])
    kernel, bias = model.get_layer("b").get_weights()
    kernel[0, :] /= 200
    model.get_layer("b").set_weights([kernel, bias])
    return model


@pytest.fixture(scope="module")
def conv_data():
    return np.random.default_rng(0).normal(size=(32, 10, 10, 3)).astype("float32")


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"c1": "int4"}, "invalid precision for 'c1'"),
        ({"nope": "int16"}, "matches no layer of model 'mixed'"),
        ("all", "expected None, 'auto' or a non-empty dict"),
        ({"c(": "int16"}, "not a valid regex"),
    ],
)
def test_bad_precision_is_refused_before_converting(conv_data, spec, match):
    with pytest.raises(ValueError, match=match):
        kmt.convert(_conv_model(), "mcu", conv_data, precision=spec, verbose=0)


def test_precision_needs_an_int8_target(conv_data):
    with pytest.raises(ValueError, match="applies to int8 targets"):
        kmt.convert(_conv_model(), "float32", precision={"c1": "int16"}, verbose=0)


def test_layer_without_an_int16_kernel_is_refused_naming_layer_and_op():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, name="fc"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Activation("hard_swish", name="hs"),
        ]
    )
    x = np.ones((4, 8), "float32")
    with pytest.raises(ValueError, match=r"'norm' \(LayerNormalization, TFLite op"):
        kmt.convert(model, "mcu", x, precision={"norm": "int16"}, verbose=0)
    with pytest.raises(ValueError, match=r"'hs' \(Activation, TFLite op HARD_SWISH"):
        kmt.convert(model, "mcu", x, precision={"hs": "int16"}, verbose=0)


def test_int16_and_float32_layers_run_in_tflite_micro(conv_data):
    model = _conv_model()
    plain = kmt.convert(model, "mcu", conv_data, verbose=0)
    spec = {"c[23]": "int16", "d": "float32"}
    result = kmt.convert(model, "mcu", conv_data, precision=spec, verbose=0)
    report = result.report
    assert report["precision"] == {
        "c1": "int8",
        "c2": "int16",
        "c3": "int16",
        "add": "int8",
        "r": "int8",
        "fl": "int8",
        "d": "float32",
    }
    # TFLite Micro ran it and agrees with LiteRT's reference kernels.
    assert report["verified"] and report["parity"]["tflm_within_tolerance"]
    assert report["parity"]["cosine"] > 0.99
    info = _tflite.parse(result.tflite)
    dtypes = {info.tensors[t].dtype for _, _, outs in info.op_sequence for t in outs}
    assert {"int8", "int16", "float32"} <= dtypes
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(result.ops)
    # The float ops are named and accepted because precision asked for them.
    assert {row["layer"] for row in report["float_layers"]} == {"d"}
    rows = {row["layer"]: row for row in report["layer_errors"]}
    assert rows["c2"]["dtype"] == "int16" and rows["d"]["dtype"] == "float32"
    before = {row["layer"]: row for row in plain.report["layer_errors"]}
    assert rows["c2"]["sqnr_db"] > before["c2"]["sqnr_db"]
    costs = report["precision_costs"]
    assert costs["size_bytes"] == result.size_bytes
    assert costs["size_bytes_int8"] == plain.size_bytes
    assert costs["arena_bytes_int8"] == plain.arena_bytes
    assert costs["arena_added_bytes"] == result.arena_bytes - plain.arena_bytes > 0
    assert costs["layers"]["c2"]["activation_bytes_added"] == 10 * 10 * 8
    assert costs["layers"]["d"]["weight_bytes_added"] > 0  # float32 weights


def test_float_layer_in_an_mcu_model_is_named_and_refused():
    class Sine(keras.layers.Layer):
        def call(self, x):
            return keras.ops.sin(x)

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8),
            Sine(name="wave"),
            keras.layers.Dense(3),
        ]
    )
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    with pytest.raises(
        ValueError, match=r"computes these layers in float: 'wave' \(SIN\)"
    ):
        kmt.convert(model, "mcu", x, verbose=0)


def test_auto_raises_the_layers_that_lose_precision():
    model = _outlier_model()
    x = np.random.default_rng(1).normal(size=(64, 16)).astype("float32")
    plain = kmt.convert(model, "mcu", x, validation_data=x, verbose=0)
    auto = kmt.convert(model, "mcu", x, validation_data=x, precision="auto", verbose=0)
    raised = {k: v for k, v in auto.report["precision"].items() if v != "int8"}
    assert "a" in raised and set(raised.values()) == {"int16"}
    worst_before = plain.report["layer_errors"][0]["sqnr_db"]
    worst_after = auto.report["layer_errors"][0]["sqnr_db"]
    assert worst_before < 10 and worst_after > worst_before + 10
    assert auto.report["parity"]["cosine"] > plain.report["parity"]["cosine"] + 0.1
    assert auto.report["verified"]
    record = next(p for p in auto.report["passes"] if p["name"] == "auto_precision")
    assert record["raised"] == raised
    budget = max(
        precision.AUTO_MAX_SIZE_RATIO * plain.size_bytes,
        plain.size_bytes + precision.AUTO_MIN_BUDGET_BYTES,
    )
    assert plain.size_bytes < auto.size_bytes <= budget


KERNEL_CASES = {
    "Dense": ((8,), lambda: keras.layers.Dense(4)),
    "Conv1D": ((10, 3), lambda: keras.layers.Conv1D(4, 3)),
    "Conv2D": ((6, 6, 3), lambda: keras.layers.Conv2D(4, 3)),
    "DepthwiseConv2D": ((6, 6, 3), lambda: keras.layers.DepthwiseConv2D(3)),
    "ReLU": ((8,), keras.layers.ReLU),
    "MaxPooling1D": ((8, 3), lambda: keras.layers.MaxPooling1D(2)),
    "MaxPooling2D": ((6, 6, 3), lambda: keras.layers.MaxPooling2D(2)),
    "AveragePooling1D": ((8, 3), lambda: keras.layers.AveragePooling1D(2)),
    "AveragePooling2D": ((6, 6, 3), lambda: keras.layers.AveragePooling2D(2)),
    "GlobalAveragePooling1D": ((8, 3), keras.layers.GlobalAveragePooling1D),
    "GlobalAveragePooling2D": ((6, 6, 3), keras.layers.GlobalAveragePooling2D),
    "Softmax": ((8,), keras.layers.Softmax),
    "Flatten": ((6, 6, 3), keras.layers.Flatten),
    "Reshape": ((6, 6, 3), lambda: keras.layers.Reshape((36, 3))),
    "BatchNormalization": ((8,), keras.layers.BatchNormalization),
    "LayerNormalization": ((8,), keras.layers.LayerNormalization),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(precision.KERNELS))
def test_kernel_table_runs_in_tflite_micro(kind):
    """Each `KERNELS` entry, at each precision it claims, between two int8
    Dense layers, converts and runs in TFLite Micro."""
    keras.utils.set_random_seed(0)
    if kind in ("Add", "Multiply", "Concatenate"):
        inp = keras.Input((8,))
        a = keras.layers.Dense(8, name="pre")(inp)
        b = keras.layers.Dense(8, name="pre2")(inp)
        mid = getattr(keras.layers, kind)(name="probe")([a, b])
        shape = (8,)
    else:
        shape, build = KERNEL_CASES[kind]
        inp = keras.Input(shape)
        mid = build()
        mid.name = "probe"
        mid = mid(inp)
    out = keras.layers.Dense(3, name="post")(keras.layers.Flatten()(mid))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(16, *shape)).astype("float32")
    for dtype in precision.KERNELS[kind][1]:
        result = kmt.convert(model, "mcu", x, precision={"probe": dtype}, verbose=0)
        assert result.report["precision"]["probe"] == dtype
        assert result.report["verified"], (kind, dtype, result.report["parity"])
        assert result.arena_bytes > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(precision.ACTIVATIONS))
def test_activation_table_runs_in_tflite_micro(name):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, name="pre"),
            keras.layers.Activation(name, name="probe"),
            keras.layers.Dense(3, name="post"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    for dtype in precision.ACTIVATIONS[name][1]:
        result = kmt.convert(model, "mcu", x, precision={"probe": dtype}, verbose=0)
        assert result.report["precision"]["probe"] == dtype
        assert result.report["verified"], (name, dtype, result.report["parity"])
