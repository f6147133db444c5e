"""QAT end to end: quantize_model -> fit -> full int8 -> TFLite Micro.

Tolerance: the TFLite Micro int8 output may differ from the QAT model's
simulated output by at most 3 steps of the output scale (integer rounding of
requantization multipliers and of fused bias adds).
"""

import keras
import numpy as np
import pytest

import keras_microtune as kmt

L = keras.layers
LSB_TOLERANCE = 3


def _fit(model, x, classes=3, epochs=1):
    model.compile("adam", "sparse_categorical_crossentropy")
    y = np.arange(len(x)) % classes
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)


def _check_int8(tools, qat, x):
    tflite = tools.to_int8(qat)
    y_micro, scale = tools.run_tflm(tflite, x)
    y_keras = keras.ops.convert_to_numpy(qat(x, training=False))
    np.testing.assert_allclose(y_micro, y_keras, atol=LSB_TOLERANCE * scale + 1e-6)
    return tflite


def _head(x):
    if len(x.shape) > 2:
        x = L.Flatten()(x)
    return L.Dense(3, activation="softmax")(x)


def _model(body, shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, _head(body(inputs)))


BODIES = {
    "dense": ((6,), lambda x: L.Dense(5, activation="relu")(x)),
    "conv1d": ((8, 2), lambda x: L.Conv1D(4, 3, padding="same", activation="relu")(x)),
    "conv2d_bn_relu": (
        (6, 6, 2),
        lambda x: L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(x))),
    ),
    "depthwise1d": ((8, 3), lambda x: L.DepthwiseConv1D(3, padding="same")(x)),
    "depthwise2d_bn_relu6": (
        (6, 6, 3),
        lambda x: L.ReLU(6.0)(
            L.BatchNormalization()(L.DepthwiseConv2D(3, depth_multiplier=2)(x))
        ),
    ),
    "separable2d": ((6, 6, 2), lambda x: L.SeparableConv2D(4, 3, activation="relu")(x)),
    "separable1d": ((8, 2), lambda x: L.SeparableConv1D(4, 3)(x)),
    "add_concat": (
        (6, 6, 2),
        lambda x: L.Concatenate()(
            [L.Add()([L.Conv2D(2, 1)(x), x]), L.Conv2D(3, 1, activation="relu")(x)]
        ),
    ),
    "pooling": (
        (8, 8, 2),
        lambda x: L.GlobalAveragePooling2D()(
            L.AveragePooling2D(2)(L.MaxPooling2D(2)(L.Conv2D(4, 1)(x)))
        ),
    ),
    "relu_reshape": ((4, 4, 2), lambda x: L.Reshape((8, 4))(L.ReLU()(x))),
    "feature_stage_1d": (
        (16, 3),
        lambda x: kmt.FeatureStage([4, 8], pooling="max", stem_filters=4)(x),
    ),
    "feature_stage_2d": (
        (8, 8, 1),
        lambda x: kmt.FeatureStage([4], activation="relu6", pooling="avg")(x),
    ),
    "embedding_output": (
        (4, 4, 3),
        lambda x: kmt.EmbeddingStage("avg", units=6, activation="relu")(x),
    ),
    "embedding_flatten_l2": (
        (4, 4, 2),
        lambda x: kmt.EmbeddingStage("flatten", units=4, normalize="l2")(x),
    ),
    "microtune": ((8,), lambda x: kmt.MicroTune(groups=2, activation="relu")(x)),
    "microtune_lowrank_sum": (
        (8,),
        lambda x: kmt.MicroTune(groups=2, rank=2, merge="sum")(L.Dense(8)(x)),
    ),
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_layer_end_to_end(name, rng, tools):
    shape, body = BODIES[name]
    model = _model(body, shape)
    x = rng.normal(size=(32, *shape)).astype("float32")
    qat = kmt.optimize.quantize_model(model)
    _fit(qat, x)
    tflite = _check_int8(tools, qat, x[:4])
    assert "DEQUANTIZE" not in tools.op_names(tflite)


def test_output_stage_and_attach(rng, tools):
    backbone = keras.Sequential(
        [
            keras.Input((16, 3)),
            kmt.FeatureStage([4, 8]),
            kmt.EmbeddingStage(),
            kmt.OutputStage(5, dropout=0.1),
        ]
    )
    model = kmt.attach(backbone, num_classes=3, groups=2)
    x = rng.normal(size=(32, 16, 3)).astype("float32")
    qat = kmt.optimize.quantize_model(model)
    assert any(
        isinstance(layer, kmt.optimize.QuantizedMicroTune) for layer in qat.layers
    )
    _fit(qat, x)
    _check_int8(tools, qat, x[:4])


def test_nested_backbone(rng, tools):
    inner_in = keras.Input((6, 6, 2))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3)(inner_in)))
    backbone = keras.Model(inner_in, h, name="backbone")
    inputs = keras.Input((6, 6, 2))
    model = keras.Model(inputs, _head(backbone(inputs)))
    x = rng.normal(size=(32, 6, 6, 2)).astype("float32")
    qat = kmt.optimize.quantize_model(model)
    assert isinstance(qat.get_layer("backbone"), keras.Model)
    _fit(qat, x)
    # strip() keeps QAT layers: they carry the ranges the converter needs.
    stripped = kmt.optimize.strip(qat)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(qat(x[:4])),
        keras.ops.convert_to_numpy(stripped(x[:4])),
    )
    _check_int8(tools, stripped, x[:4])


def test_input_model_unchanged(rng):
    shape, body = BODIES["conv2d_bn_relu"]
    model = _model(body, shape)
    before = [w.copy() for w in model.get_weights()]
    names = [layer.name for layer in model.layers]
    qat = kmt.optimize.quantize_model(model)
    _fit(qat, rng.normal(size=(32, *shape)).astype("float32"))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [layer.name for layer in model.layers] == names


def test_unsupported_layer_raises_with_advice():
    # A LayerNormalization over another axis than the last has no int8 form.
    inputs = keras.Input((4, 6))
    model = keras.Model(inputs, _head(L.LayerNormalization(1, name="ln")(inputs)))
    with pytest.raises(
        ValueError, match="layer 'ln' of type LayerNormalization.*unsupported='float'"
    ):
        kmt.optimize.quantize_model(model)
    with pytest.raises(ValueError, match="Received: unsupported='skip'"):
        kmt.optimize.quantize_model(model, unsupported="skip")


def test_layer_norm_simulates_tflite_micro_int8(rng, tools):
    from keras_microtune.optimize.quantize_norm import QuantizeLayerNorm

    inputs = keras.Input((5, 8))
    model = keras.Model(
        inputs, L.LayerNormalization(name="ln")(L.Dense(8, name="embed")(inputs))
    )
    qat = kmt.optimize.quantize_model(model)  # Supported: no unsupported='float'.
    norm = qat.get_layer("quant_ln")
    assert isinstance(norm, QuantizeLayerNorm)
    last = keras.Model(inputs, L.LayerNormalization(2, name="ln2")(inputs))
    wrapped = kmt.optimize.quantize_model(last).get_layer("quant_ln2")
    assert isinstance(wrapped, QuantizeLayerNorm)  # axis=2 is the last axis.
    # Tokens whose spreads differ 6x: int8 rounding of the deviation matters.
    spread = np.geomspace(0.5, 3.0, 5)[None, :, None]
    data = (rng.normal(size=(48, 5, 8)) * spread).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(data, data, epochs=2, batch_size=16, verbose=0)
    # Every inner tensor has a fake-quant range: full int8 without calibration.
    tflite = tools.to_int8(qat)
    assert "L2_NORMALIZATION" in tools.op_names(tflite)
    assert "DEQUANTIZE" not in tools.op_names(tflite)
    micro, scale = tools.run_tflm(tflite, data[:8])
    simulated = keras.ops.convert_to_numpy(qat(data[:8]))
    # Float LayerNorm on the same int8 input (what QAT simulated before):
    # TFLite Micro is further from it than from the simulated int8 form.
    embedded = keras.Model(qat.inputs, qat.get_layer("quant_embed").output)(data[:8])
    float_norm = norm.output_quantizer(norm.layer(embedded))
    float_norm = keras.ops.convert_to_numpy(float_norm)
    error = np.abs(micro - simulated).mean() / scale
    assert error < 0.7 * np.abs(micro - float_norm).mean() / scale, error
    assert error < 1.0, error  # Steps of the output scale, on average.
    result = kmt.convert(qat, "mcu", verbose=0)  # No representative_data.
    assert "DEQUANTIZE" not in result.ops and "L2_NORMALIZATION" in result.ops
    assert not result.report.get("lowering", {}).get("layers")  # Not lowered twice.


def test_standalone_batch_norm_explains():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, _head(L.BatchNormalization(name="bn")(inputs)))
    with pytest.raises(ValueError, match="cannot fold BatchNormalization layer 'bn'"):
        kmt.optimize.quantize_model(model)


def test_unsupported_layer_left_in_float(rng, tools):
    inputs = keras.Input((6,))
    x = L.LeakyReLU(0.1, name="leaky")(L.Dense(5)(inputs))
    model = keras.Model(inputs, _head(x))
    qat = kmt.optimize.quantize_model(model, unsupported="float")
    data = rng.normal(size=(32, 6)).astype("float32")
    _fit(qat, data)
    _check_int8(tools, qat, data[:4])


def test_unsupported_multi_input_layer_left_in_float(rng):
    # MultiHeadAttention's build needs the query and value shapes: the float
    # copy is built by its first call and keeps the trained weights.
    inputs = keras.Input((5, 4))
    x = L.MultiHeadAttention(2, 2, name="mha")(inputs, inputs)
    model = keras.Model(inputs, _head(L.LayerNormalization(name="ln")(x)))
    qat = kmt.optimize.quantize_model(model, unsupported="float")
    for a, b in zip(
        qat.get_layer("mha").get_weights(), model.get_layer("mha").get_weights()
    ):
        np.testing.assert_array_equal(a, b)
    data = rng.normal(size=(16, 5, 4)).astype("float32")
    _fit(qat, data)
    assert np.isfinite(keras.ops.convert_to_numpy(qat(data))).all()


def test_not_a_model():
    with pytest.raises(TypeError, match="Received: model of type Dense"):
        kmt.optimize.quantize_model(L.Dense(3))


def test_keras_round_trip(tmp_path, rng):
    shape, body = BODIES["feature_stage_1d"]
    model = kmt.attach(_model(body, shape), num_classes=3, groups=2)
    x = rng.normal(size=(32, *shape)).astype("float32")
    qat = kmt.optimize.quantize_model(model)
    _fit(qat, x)
    path = tmp_path / "qat.keras"
    qat.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(qat(x[:4])),
        keras.ops.convert_to_numpy(loaded(x[:4])),
    )


def test_hooks(rng):
    shape, body = BODIES["conv2d_bn_relu"]
    qat = kmt.optimize.quantize_model(_model(body, shape))
    x = rng.normal(size=(32, *shape)).astype("float32")
    _fit(qat, x)

    def values(name):
        return [
            keras.ops.convert_to_numpy(v).copy()
            for v in qat.variables
            if name in v.path
        ]

    assert kmt.optimize.freeze_ranges(qat) > 0
    assert kmt.optimize.freeze_batch_norm(qat) == 1
    ranges, means = values("range_m"), values("moving_mean")
    _fit(qat, x * 3)
    for a, b in zip(ranges + means, values("range_m") + values("moving_mean")):
        np.testing.assert_array_equal(a, b)
    assert kmt.optimize.set_quantization_enabled(qat, False) > 0
    _fit(qat, x)  # float training steps still run
    assert np.isfinite(keras.ops.convert_to_numpy(qat(x))).all()


def test_kmt_convert_mcu_without_representative_data(rng):
    backbone = keras.Sequential(
        [keras.Input((16, 3)), kmt.FeatureStage([4, 8]), kmt.EmbeddingStage()]
    )
    qat = kmt.optimize.quantize_model(kmt.attach(backbone, num_classes=3, groups=2))
    x = rng.normal(size=(32, 16, 3)).astype("float32")
    _fit(qat, x)
    result = kmt.convert(qat, target="mcu", validation_data=x[:8], verbose=0)
    assert "DEQUANTIZE" not in result.ops and "QUANTIZE" not in result.ops
    assert result.parity["tflm_matches_litert"]
    # Softmax output: int8 scale 1/256; allow 3 steps.
    assert result.parity["max_abs_error"] <= LSB_TOLERANCE / 256


def _adapter_model():
    inputs = keras.Input((8, 8, 1))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(inputs)))
    x = kmt.MicroTune(groups=2)(kmt.EmbeddingStage()(x))
    return keras.Model(inputs, kmt.OutputStage(3)(x))


def test_mixed_precision(rng):
    keras.config.set_dtype_policy("mixed_float16")
    qat = kmt.optimize.quantize_model(_adapter_model())
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    _fit(qat, x)
    assert np.isfinite(keras.ops.convert_to_numpy(qat(x))).all()


def test_mirrored_strategy(rng, mirrored):
    strategy = mirrored
    with strategy.scope():
        qat = kmt.optimize.quantize_model(_adapter_model())
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    with strategy.scope():
        qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x, np.arange(16) % 3, batch_size=8, verbose=0)
    ranges = [v for v in qat.variables if v.name == "range_initialized"]
    assert ranges and all(float(v.numpy()) == 1.0 for v in ranges)
