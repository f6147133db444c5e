"""convert(): real LiteRT and TFLite Micro runs of the converted models."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import _tflite, runtimes

from .conftest import BUILDERS, DYNAMIC_OPS

MCU_OPS = {
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "MAX_POOL_2D",
    "AVERAGE_POOL_2D",
    "RESHAPE",
    "MEAN",
    "FULLY_CONNECTED",
    "SOFTMAX",
    "ADD",
    "MUL",
    "SPLIT",
    "CONCATENATION",
    "LOGISTIC",
    "L2_NORMALIZATION",
    "EXPAND_DIMS",
    "SQUEEZE",
    "SUM",
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_mcu_model_runs_bit_exact_in_tflite_micro(name, mcu_results):
    result = mcu_results[name]
    info = _tflite.parse(result.tflite)
    assert not set(result.ops) & DYNAMIC_OPS
    assert set(result.ops) <= MCU_OPS, result.ops
    assert [info.tensors[t].dtype for t in info.inputs + info.outputs] == ["int8"] * 2
    assert info.tensors[info.inputs[0]].shape[0] == 1
    assert not info.has_signatures and not info.metadata
    assert all(t.name == "" for t in info.tensors)
    assert result.report["stripped_bytes_saved"] > 0
    p = result.parity
    assert p["tflm_matches_litert"] and p["tflm_max_abs_diff"] == 0.0
    assert p["top1_agreement"] >= 0.9, p
    assert p["cosine"] > 0.99, p
    mem = result.report["memory"]
    assert 0 < mem["activation_lower_bound_bytes"] <= result.arena_bytes
    assert result.arena_bytes % 16 == 0 and result.fits and result.report["verified"]


def test_arena_is_smallest_that_runs(mcu_results):
    tflite = mcu_results["ds_cnn"].tflite
    arena = mcu_results["ds_cnn"].arena_bytes
    x = np.zeros((1, 20, 10, 1), np.int8)
    out = runtimes.tflm_run(tflite, [x], arena)
    assert out[0].shape == (1, 3)
    with pytest.raises(runtimes.RuntimeFailure, match="TFLite Micro failed"):
        runtimes.tflm_run(tflite, [x], arena - 16)


def test_stage_ops_are_those_of_the_design(mcu_results):
    ops = set(mcu_results["stages"].ops)
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= ops
    assert {"SPLIT", "CONCATENATION"} & ops or "FULLY_CONNECTED" in ops


@pytest.mark.parametrize(
    "target, tolerance",
    [
        ("float32", 1e-5),
        ("mobile-float16", 5e-3),
        ("mobile-dynamic", 5e-2),
        ("mobile-int8", 5e-2),
        ("android", 5e-2),
    ],
)
def test_mobile_targets_run_in_litert(target, tolerance, trained):
    model, x, y = trained["stages"]
    result = kmt.convert(
        model, target, representative_data=x[:32], validation_data=(x, y), verbose=0
    )
    assert result.arena_bytes is None
    assert not any(op.startswith("CUSTOM") or "FLEX" in op for op in result.ops)
    assert result.parity["max_abs_error"] < tolerance, result.parity
    assert result.parity["top1_agreement"] >= 0.95
    if target in ("mobile-int8", "android"):
        assert result.parity["tflm_matches_litert"]


def test_strip_keeps_outputs_bit_identical(trained):
    import tensorflow as tf

    model, x, _ = trained["residual"]
    result = kmt.convert(model, "mcu", representative_data=x[:16], verbose=0)
    # Re-add names to the stripped model is not possible; instead strip a model
    # converted with the plain converter (which keeps names and metadata).
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    full = conv.convert()
    stripped = _tflite.strip(full)
    assert len(stripped) < len(full)
    assert _tflite.parse(full).metadata and not _tflite.parse(stripped).metadata
    xs = [x[:4]]
    a = runtimes.litert_run(full, xs, reference=True)
    b = runtimes.litert_run(stripped, xs, reference=True)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert result.report["stripped_bytes_saved"] > 0


class QDense(keras.layers.Layer):
    """A dense layer trained with fake quantization of weights and outputs."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], self.units))
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros")

    def call(self, x):
        fq = keras.quantizers.fake_quant_with_min_max_vars
        kernel = fq(self.kernel, -1.0, 1.0, narrow_range=True)
        return fq(keras.ops.matmul(x, kernel) + self.bias, -4.0, 4.0)


class FakeQuant(keras.layers.Layer):
    def call(self, x):
        return keras.quantizers.fake_quant_with_min_max_vars(x, -4.0, 4.0)


def test_qat_model_needs_no_representative_data():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), FakeQuant(), QDense(4), keras.layers.Softmax()]
    )
    result = kmt.convert(model, "mcu", verbose=0)
    assert result.report["conversion"]["quantization_aware_training"]
    assert result.ops == ["FULLY_CONNECTED", "SOFTMAX"]
    assert result.parity["tflm_matches_litert"]
    assert result.parity["cosine"] > 0.999
    assert result.arena_bytes > 0
    with pytest.raises(ValueError, match="needs `representative_data`"):
        kmt.convert(keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]), "mcu")


def test_tf_keras_model_converts():
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential(
        [
            tf_keras.Input((10,)),
            tf_keras.layers.Dense(8, activation="relu"),
            tf_keras.layers.Dense(3, activation="softmax"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(32, 10)).astype("float32")
    result = kmt.convert(model, "cortex-m4", representative_data=x, verbose=0)
    assert set(result.ops) == {"FULLY_CONNECTED", "SOFTMAX"}
    assert result.parity["tflm_matches_litert"] and result.parity["cosine"] > 0.99


def test_keras_file_and_lambda_refused(tmp_path, trained):
    model, x, _ = trained["conv1d"]
    path = tmp_path / "m.keras"
    model.save(path)
    result = kmt.convert(str(path), "mcu", representative_data=x[:8], verbose=0)
    assert result.name == "m" and result.parity["tflm_matches_litert"]
    lam = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2)])
    lam.save(tmp_path / "lam.keras")
    with pytest.raises(ValueError, match="safe_mode=False"):
        kmt.convert(str(tmp_path / "lam.keras"), "mcu", representative_data=x[:2])


def test_does_not_fit_reports_and_strict_raises(trained):
    model, x, _ = trained["residual"]
    tiny = kmt.targets.Target("tiny", "test", "tflm", "int8", "int8", 1024, 2048)
    result = kmt.convert(model, tiny, representative_data=x[:8], verbose=0)
    assert not result.fits
    assert any("over by" in p for p in result.report["budget"]["problems"])
    with pytest.raises(kmt.export.DoesNotFitError, match="RAM: needs"):
        kmt.convert(model, tiny, representative_data=x[:8], strict=True, verbose=0)


def test_unsupported_op_names_layer_and_op(tmp_path):
    import tensorflow as tf

    class Det(keras.layers.Layer):
        def call(self, x):
            return tf.reshape(tf.linalg.det(tf.reshape(x, (-1, 2, 2))), (-1, 1))

    inp = keras.Input((4,))
    model = keras.Model(inp, Det(name="det_layer")(inp))
    with pytest.raises(ValueError, match="MatrixDeterminant.*det_layer"):
        kmt.convert(model, "float32", output_dir=tmp_path / "out", verbose=0)
    assert not (tmp_path / "out").exists()


def test_bad_arguments(trained):
    model, x, _ = trained["conv1d"]
    with pytest.raises(ValueError, match="expected one of .*'cortex-m4'"):
        kmt.convert(model, "cortex-m99", representative_data=x)
    bad = x[:4].copy()
    bad[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN in sample 2"):
        kmt.convert(model, "mcu", representative_data=bad)
    with pytest.raises(ValueError, match=r"axis 2 is 5, expected 6"):
        kmt.convert(model, "mcu", representative_data=x[:, :, :5])


def _named(model, inner="inner", layer="hidden"):
    """The same weights under any names; `inner` is a nested model."""
    keras.utils.set_random_seed(0)
    block = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu", name=layer)],
        name=inner,
    )
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, name="out")(block(inputs))
    return keras.Model(inputs, outputs, name=model)


X_NAMED = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")


@pytest.fixture(scope="module")
def plainly_named():
    return {
        target: kmt.convert(_named("plain"), target, X_NAMED, verbose=0)
        for target in ("mcu", "mobile-int8")
    }


@pytest.mark.parametrize(
    "names",
    [
        {"model": "my model"},
        {"model": "modèle"},
        {"model": "net(v2)"},
        {"model": "_private", "inner": "sub model", "layer": "dense 1"},
    ],
    ids=lambda names: "-".join(names.values()),
)
def test_names_tensorflow_rejects_convert_as_plain_ones(names, plainly_named):
    """Issue 18: Keras builds and saves these, TensorFlow's name scopes reject
    them ("'my model' is not a valid root scope name")."""
    model = _named(**names)
    before = [layer.name for layer in model._flatten_layers(recursive=True)]
    result = kmt.convert(model, "mcu", X_NAMED, verbose=0)
    assert result.tflite == plainly_named["mcu"].tflite  # Names are stripped.
    assert result.name == names["model"]
    assert result.parity["tflm_matches_litert"]
    assert [layer.name for layer in model._flatten_layers(recursive=True)] == before
    assert set(names.values()) <= {model.name, *before}


def test_rejected_names_on_mobile_and_from_a_keras_file(tmp_path, plainly_named):
    model = _named("my model", "sub model", "dense 1")
    mobile = kmt.convert(model, "mobile-int8", X_NAMED, verbose=0)
    expected = runtimes.litert_run(plainly_named["mobile-int8"].tflite, [X_NAMED])
    for got, want in zip(runtimes.litert_run(mobile.tflite, [X_NAMED]), expected):
        np.testing.assert_array_equal(got, want)
    model.save(tmp_path / "my model.keras")
    loaded = kmt.convert(str(tmp_path / "my model.keras"), "mcu", X_NAMED, verbose=0)
    assert loaded.tflite == plainly_named["mcu"].tflite
    assert loaded.name == "my model"
