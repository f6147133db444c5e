"""Ops TFLite Micro lacks in int8, lowered before tracing (`lower_for_micro`).

Each conversion runs in the real TFLite Micro interpreter (arena search and
parity against LiteRT's reference kernels) and is compared with the float
Keras model.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_microtune as kmt
from keras_microtune.export import (
    _tflite,
    kernel_parity,
    lowered_forms,
    lowering,
    parity,
    runtimes,
)

# TFLite ops that must not be left in a TFLite Micro int8 model.
FLOAT_OR_MISSING = {"GELU", "ELU", "EXP", "LOG", "SELECT", "DEQUANTIZE", "QUANTIZE"}


def _x(n=96, width=16, scale=3.0):
    return np.random.default_rng(0).normal(0, scale, (n, width)).astype("float32")


def tiny_transformer(shape, classes, width=16, heads=2):
    """Dense embedding, self-attention, LayerNorm, a GELU feed-forward block."""
    inp = keras.Input(shape)
    x = keras.layers.Dense(width, name="embed")(inp)
    a = keras.layers.MultiHeadAttention(heads, width // heads, name="attention")(x, x)
    x = keras.layers.LayerNormalization(name="norm1")(keras.layers.Add()([x, a]))
    f = keras.layers.Dense(2 * width, activation="gelu", name="ffn_in")(x)
    f = keras.layers.Dense(width, name="ffn_out")(f)
    x = keras.layers.LayerNormalization(name="norm2")(keras.layers.Add()([x, f]))
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="tiny_transformer")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("gelu", {}),
        ("elu", {}),
        ("elu", {"alpha": 0.5}),
        ("selu", {}),
        ("celu", {"alpha": 2.0}),
        ("mish", {}),
        ("soft_shrink", {}),
        ("sparse_plus", {}),
    ],
)
def test_lowered_forms_match_keras_in_float(name, kwargs):
    grid = np.linspace(-12, 12, 2001, dtype="float32")
    exact = ops.convert_to_numpy(keras.activations.get(name)(grid, **kwargs))
    lowered = ops.convert_to_numpy(lowering.LOWERED[name][0](grid, **kwargs))
    tolerance = 5e-4 if name == "gelu" else 1e-5 * max(1.0, np.abs(exact).max())
    np.testing.assert_allclose(lowered, exact, atol=tolerance)
    assert lowering.formula_error(name, **kwargs) <= tolerance


def test_gelu_form_is_within_2e4_of_the_tanh_approximation():
    grid = np.linspace(-8, 8, 2001, dtype="float32")
    tanh_form = ops.convert_to_numpy(keras.activations.gelu(grid, approximate=True))
    lowered = ops.convert_to_numpy(lowered_forms.gelu(grid))
    np.testing.assert_allclose(lowered, tanh_form, atol=2e-4)


def _activations_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    x = keras.layers.Dense(16, activation="gelu", name="d_gelu")(inp)
    x = keras.layers.Dense(16, name="d_linear")(x)
    x = keras.layers.Activation("selu", name="a_selu")(x)
    x = keras.layers.Dense(16, activation="mish", name="d_mish")(x)
    x = keras.layers.ELU(alpha=0.5, name="l_elu")(x)
    x = keras.layers.Dense(16, activation="sparse_plus", name="d_sparse_plus")(x)
    out = keras.layers.Dense(4, name="out")(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def activations_result():
    model = _activations_model()
    x = _x()
    return model, x, kmt.convert(model, "mcu", representative_data=x, verbose=0)


def test_lowered_activations_run_int8_in_tflite_micro(activations_result):
    model, x, result = activations_result
    assert not FLOAT_OR_MISSING & set(result.ops), result.ops
    assert result.arena_bytes > 0  # TFLite Micro allocated and ran it.
    assert result.parity["tflm_within_tolerance"]
    # int8 in TFLite Micro vs the float model with Keras' own activations.
    y = model.predict(x, verbose=0)
    assert result.parity["max_abs_error"] < 0.04 * (y.max() - y.min())
    assert result.parity["cosine"] > 0.999


def test_report_lists_each_lowered_layer_with_its_error(activations_result):
    _, _, result = activations_result
    (planned,) = [p for p in result.report["passes"] if p["name"] == "lower_for_micro"]
    ops_by_layer = {row["layer"]: row["op"] for row in planned["lowered"]}
    assert ops_by_layer == {
        "d_gelu": "gelu",
        "a_selu": "selu",
        "d_mish": "mish",
        "l_elu": "elu",
        "d_sparse_plus": "sparse_plus",
    }
    errors = {row["layer"]: row["formula_max_abs_error"] for row in planned["lowered"]}
    assert 1e-4 < errors["d_gelu"] < 5e-4  # An approximation: its error is shown.
    assert max(v for k, v in errors.items() if k != "d_gelu") < 1e-5
    measured = result.report["lowering"]
    assert measured["samples"] == 64
    assert 0 < measured["outputs_max_abs_error"] < 1e-2
    names = [p["name"] for p in result.report["passes"]]
    assert names.index("lower_for_micro") < names.index("trace")
    assert names.index("lowering_error") < names.index("convert_to_tflite")


def test_the_model_passed_in_is_left_unchanged(activations_result):
    model, _, _ = activations_result
    assert model.get_layer("d_gelu").activation is keras.activations.gelu
    assert model.get_layer("a_selu").activation is keras.activations.selu
    assert "call" not in vars(model.get_layer("l_elu"))


@pytest.mark.parametrize(
    "activation, match",
    [
        ("softplus", r"'hidden' uses activation 'softplus'.*EXP and LOG.*'relu'"),
        ("exponential", r"'hidden' uses activation 'exponential'.*'sigmoid'"),
    ],
)
def test_activation_without_an_int8_form_is_refused_before_converting(
    activation, match, tmp_path
):
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, activation=activation, name="hidden")]
    )
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        kmt.convert(model, "mcu", representative_data=_x(8, 8), output_dir=out)
    assert not out.exists()


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_in_a_lambda_is_refused_naming_the_layer(approximate):
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, name="proj"),
            keras.layers.Lambda(
                lambda t: ops.gelu(t, approximate=approximate), name="my_gelu"
            ),
        ]
    )
    with pytest.raises(ValueError, match=r"\['my_gelu'\] compute \['GELU.*'gelu'"):
        kmt.convert(model, "mcu", representative_data=_x(8, 8), verbose=0)


def test_mobile_targets_keep_gelu():
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8, activation="gelu")]
    )
    result = kmt.convert(model, "mobile-int8", representative_data=_x(), verbose=0)
    assert "GELU" in result.ops  # LiteRT has an int8 GELU kernel.
    assert "lower_for_micro" not in [p["name"] for p in result.report["passes"]]
    assert "GELU" in result.parity["tflm_error"]  # Cross-check skipped, said why.


def test_rms_group_and_unit_normalization_run_int8_in_tflite_micro():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 16)),
            keras.layers.Dense(16),
            keras.layers.RMSNormalization(name="rms"),
            keras.layers.GroupNormalization(4, name="group"),
            keras.layers.UnitNormalization(name="unit"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    x = np.random.default_rng(0).normal(0, 1, (32, 8, 16)).astype("float32")
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    assert not FLOAT_OR_MISSING & set(result.ops) and "SQUARE" not in result.ops
    assert {"RSQRT", "MEAN"} <= set(result.ops) and "SUM" not in result.ops
    assert result.parity["tflm_within_tolerance"]
    assert result.parity["cosine"] > 0.99
    lowered = {row["layer"]: row["op"] for row in result.report["lowering"]["layers"]}
    assert lowered == {
        "rms": "rms_normalization",
        "group": "group_normalization",
        "unit": "unit_normalization",
    }


@pytest.fixture(scope="module")
def transformer():
    keras.utils.set_random_seed(0)
    model = tiny_transformer((16, 6), 4)
    x = np.random.default_rng(0).normal(0, 1, (64, 16, 6)).astype("float32")
    return model, x, kmt.convert(model, "mcu", representative_data=x, verbose=0)


def test_untrained_transformer_converts_full_int8_for_tflite_micro(transformer):
    model, x, result = transformer
    assert {"BATCH_MATMUL", "SOFTMAX", "L2_NORMALIZATION", "LOGISTIC"} <= set(
        result.ops
    )
    assert not FLOAT_OR_MISSING & set(result.ops) and "NEG" not in result.ops
    assert result.parity["tflm_within_tolerance"]
    assert result.parity["cosine"] > 0.999
    lowered = {row["layer"]: row["op"] for row in result.report["lowering"]["layers"]}
    assert lowered == {
        "norm1": "layer_normalization",
        "ffn_in": "gelu",
        "norm2": "layer_normalization",
    }
    assert "call" not in vars(model.get_layer("norm1"))


def test_transformer_kernels_match_litert_but_fully_connected_rounding(transformer):
    # Fed the same inputs, every TFLite Micro kernel of the transformer
    # (BATCH_MATMUL, SOFTMAX, L2_NORMALIZATION, MEAN, ...) is bit-exact with
    # LiteRT's reference kernel; FULLY_CONNECTED rounds 1 step apart.
    _, x, result = transformer
    info = _tflite.parse(result.tflite)
    ins, _ = runtimes.io_details(result.tflite)
    q = [runtimes.quantize(x[:4], ins[0])]
    check = kernel_parity.check(result.tflite, info, q)
    assert check["within_tolerance"] and check["samples"] == 4
    assert set(check["ops"]) == set(info.ops)
    off = {op: row["max_abs_diff"] for op, row in check["ops"].items()}
    assert {"L2_NORMALIZATION", "SOFTMAX", "BATCH_MATMUL"} <= set(off)
    assert {op for op, d in off.items() if d} <= {"FULLY_CONNECTED"}
    assert off["FULLY_CONNECTED"] == 1  # The rounding difference is real here.


def test_outputs_beyond_tolerance_verify_only_kernel_by_kernel(
    transformer, monkeypatch
):
    # Force the end-to-end check to fail (0 steps allowed): the kernel check
    # decides, and refuses once FULLY_CONNECTED's 1 step is not allowed.
    model, x, result = transformer
    target = kmt.targets.get("mcu")
    monkeypatch.setattr(parity, "TFLM_TOLERANCE_STEPS", 0)
    got = parity.measure(model, result.tflite, target, [x[:8]])
    assert got["tflm_max_abs_diff"] > 0
    assert got["tflm_reference"] == "kernels" and got["tflm_within_tolerance"]
    monkeypatch.setattr(kernel_parity, "KERNEL_TOLERANCE_STEPS", {})
    got = parity.measure(model, result.tflite, target, [x[:8]])
    assert not got["tflm_kernels"]["within_tolerance"]
    assert not got["tflm_within_tolerance"] and "tflm_reference" not in got


def test_kernel_check_keeps_tensors_without_a_batch_axis_wired(rng):
    """A RESHAPE that drops the batch-1 axis ((1, 1, 1, 8) -> (8,), as a
    MicroTune adapter on MobileNetV2 converts) feeds an ADD: that tensor
    cannot be fed sample by sample, so it stays computed by its RESHAPE
    (before, the check failed with "Dimension mismatch" and `convert` with it)."""
    import tensorflow as tf

    from benchmarks.conversion import plain_convert

    inputs = keras.Input((4, 4, 3), batch_size=1)
    y = keras.layers.Conv2D(8, 4)(inputs)  # (1, 1, 1, 8)
    flat = keras.layers.Lambda(lambda t: tf.reshape(t, (8,)))(y)
    model = keras.Model(inputs, keras.layers.Lambda(lambda a: a[0] + a[1])([y, flat]))
    x = rng.random((16, 4, 4, 3)).astype("float32")
    tflite = plain_convert(model, x, fixed_batch=True)
    info = _tflite.parse(tflite)
    add = next(ins for op, ins, _ in info.op_sequence if op == "ADD")
    assert sorted(info.tensors[t].shape for t in add) == [(1, 1, 1, 8), (8,)]
    ins, _ = runtimes.io_details(tflite)
    check = kernel_parity.check(tflite, info, [runtimes.quantize(x[:4], ins[0])])
    assert check["samples"] == 4 and {"ADD", "CONV_2D"} <= set(check["ops"])
    assert check["within_tolerance"], check


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize(
    "make",
    [
        keras.layers.LayerNormalization,
        lambda: keras.layers.LayerNormalization(axis=(1, 2)),
        lambda: keras.layers.LayerNormalization(rms_scaling=True),
        lambda: keras.layers.LayerNormalization(center=False),
        keras.layers.RMSNormalization,
        keras.layers.UnitNormalization,
        lambda: keras.layers.GroupNormalization(3),
        lambda: keras.layers.GroupNormalization(2, axis=1),
    ],
)
def test_lowered_normalizations_equal_keras(make):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(2, 3, (4, 4, 6)).astype("float32")
    layer = make()
    layer.build(x.shape)
    layer.set_weights([w + 0.3 for w in layer.get_weights()])
    expected = ops.convert_to_numpy(layer(x))
    (low,) = lowering.plan(keras.Sequential([keras.Input(x.shape[1:]), layer]))
    with lowering.applied([low]):
        got = ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _digit_rows():
    """scikit-learn's 8x8 digits as sequences: 8 time steps of 8 pixels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], digits.target[order].astype("int32")


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "basic_motions"])
def test_trained_transformer_keeps_its_accuracy_in_tflite_micro(data):
    if data == "digits":
        x, y = _digit_rows()
        (x_train, y_train), (x_test, y_test) = (
            (x[:1300], y[:1300]),
            (x[1300:], y[1300:]),
        )
        classes, epochs, batch = 10, 10, 32
    else:
        split = kmt.data.load_basic_motions()
        (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
        classes, epochs, batch = 4, 30, 8
    keras.utils.set_random_seed(0)
    model = tiny_transformer(x_train.shape[1:], classes)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=epochs, batch_size=batch, verbose=0)
    float_accuracy = kmt.evaluate(model, x_test, y_test, runtime="keras")["accuracy"]
    result = kmt.convert(model, "mcu", representative_data=x_train[:300], verbose=0)
    assert not FLOAT_OR_MISSING & set(result.ops), result.ops
    tflm = kmt.evaluate(result.tflite, x_test, y_test, runtime="tflm")
    assert float_accuracy > (0.75 if data == "digits" else 0.9)
    assert tflm["accuracy"] >= float_accuracy - 0.02


def test_quantization_aware_gelu_is_lowered_and_needs_calibration():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(16, activation="gelu", name="hidden"),
            keras.layers.Dense(4),
        ]
    )
    qat = kmt.optimize.quantize_model(model)
    x = _x(64, 16, 1.0)
    with pytest.raises(ValueError, match=r"'quant_hidden'.*representative_data"):
        kmt.convert(qat, "mcu", verbose=0)
    result = kmt.convert(qat, "mcu", representative_data=x, verbose=0)
    assert not FLOAT_OR_MISSING & set(result.ops), result.ops
    (row,) = result.report["lowering"]["layers"]
    assert (row["layer"], row["op"]) == ("quant_hidden", "gelu")
    assert result.parity["tflm_within_tolerance"]


def test_layer_normalization_keeps_tokens_of_small_variance_in_int8():
    # Tokens whose scales spread over e^±2: an int8 variance (Keras' form, or
    # MEAN/RSQRT) reaches cosine 0.76 against float here; L2_NORMALIZATION 0.94.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16, 16)) * np.exp(rng.normal(0, 1.0, (64, 16, 1)))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16)),
            keras.layers.LayerNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    result = kmt.convert(model, "mcu", representative_data=x.astype("float32"))
    assert "L2_NORMALIZATION" in result.ops and "RSQRT" not in result.ops
    assert result.parity["cosine"] > 0.9
    assert result.parity["tflm_within_tolerance"]
