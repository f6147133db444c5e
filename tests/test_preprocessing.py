"""Preprocessing shipped with the model: Rescaling/Normalization fed raw values."""

import subprocess

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import input_metadata, runtimes

ARENA = 1 << 20


def _model(first):
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            first,
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def _pixels(rng, n=48):
    return rng.integers(0, 256, (n, 6, 6, 3)).astype("float32")


def _device_outputs(result, x_raw):
    """Feed raw values the way the device does, run TFLite Micro, dequantize."""
    q = result.quantize_input(x_raw)
    raw = runtimes.tflm_run(result.tflite, [q], ARENA)[0]
    return runtimes.dequantize(raw, runtimes.io_details(result.tflite)[1][0])


def _assert_matches_float(model, result, x_raw):
    expected = np.asarray(model(x_raw))
    got = _device_outputs(result, x_raw)
    spread = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=0.05 * spread)
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.9


def test_rescaling_is_folded_into_uint8_input(rng):
    x = _pixels(rng)
    model = _model(keras.layers.Rescaling(1 / 127.5, offset=-1.0))
    result = kmt.convert(model, "mcu", x, input_type="uint8", verbose=0)
    feed = result.report["input"]
    assert feed["dtype"] == "uint8"
    assert feed["preprocessing"]["folded"] is True
    assert not {"MUL", "ADD", "SUB"} & set(result.ops)
    # raw = scale * (q - zero_point); the model's own int8 input is normalized.
    detail = runtimes.io_details(result.tflite)[0][0]
    s_n, z_n = detail["quantization"]
    assert feed["scale"] == pytest.approx(s_n * 127.5)
    assert feed["zero_point"] == pytest.approx(z_n + (-1.0) / s_n)
    assert feed["raw_min"] < 1 and feed["raw_max"] > 254
    assert "uint8" in feed["feed"] and "folded" in feed["feed"]
    q = result.quantize_input(x)
    assert q.dtype == np.uint8
    _assert_matches_float(model, result, x)


def test_per_tensor_normalization_folded_int8(rng):
    x = rng.normal(500.0, 40.0, (48, 6, 6, 3)).astype("float32")  # ADC counts
    norm = keras.layers.Normalization(axis=None)
    norm.adapt(x)
    model = _model(norm)
    result = kmt.convert(model, "mcu", x, verbose=0)
    feed = result.report["input"]
    assert feed["dtype"] == "int8" and feed["preprocessing"]["folded"]
    s_n, z_n = runtimes.io_details(result.tflite)[0][0]["quantization"]
    mean, std = float(np.mean(x)), float(np.std(x))
    assert feed["scale"] == pytest.approx(s_n * std, rel=1e-3)
    assert feed["zero_point"] == pytest.approx(z_n - mean / (std * s_n), rel=1e-3)
    assert feed["raw_min"] < x.min() + 10 and feed["raw_max"] > x.max() - 10
    _assert_matches_float(model, result, x)
    header = result.files()["model_data.h"].decode()
    assert "inline int8_t quantize_input(float raw)" in header
    assert "constexpr float kInputZeroPoint" in header
    assert "device input" in result.files()["report.md"].decode()


def test_per_channel_normalization_is_folded_per_channel(rng, tmp_path):
    # Channels in different units: one int8 scale for all raw channels would
    # leave the narrow one a few levels; folded, each gets its own.
    x = rng.normal([0.0, 100.0, -50.0], [0.1, 20.0, 5.0], (48, 6, 6, 3))
    x = x.astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = _model(norm)
    result = kmt.convert(model, "mcu", x, verbose=0)
    feed = result.report["input"]
    assert feed["preprocessing"]["folded"] is True
    assert not {"MUL", "ADD", "SUB"} & set(result.ops)
    s_n, z_n = runtimes.io_details(result.tflite)[0][0]["quantization"]
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    np.testing.assert_allclose(feed["scale"], s_n * std, rtol=1e-3)
    np.testing.assert_allclose(feed["zero_point"], z_n - mean / (std * s_n), rtol=1e-3)
    assert len(feed["raw_min"]) == len(feed["raw_max"]) == 3
    assert "per channel" in feed["feed"]
    q = result.quantize_input(x)  # Channel c: round(raw / scale[c] + zero[c]).
    manual = np.round(x / np.array(feed["scale"]) + np.array(feed["zero_point"]))
    np.testing.assert_array_equal(q, np.clip(manual, -128, 127).astype(np.int8))
    _assert_matches_float(model, result, x)
    entry = input_metadata.read(result.tflite)  # The file says how to feed it.
    assert entry["metadata"]["version"] == 2
    assert {k: v for k, v in entry.items() if k != "metadata"} == {
        k: v for k, v in feed.items() if k != "metadata"
    }
    header = result.files()["model_data.h"].decode()
    assert "inline int8_t quantize_input(float raw, int channel)" in header
    source = tmp_path / "check.cc"
    source.write_text(header + "\nint main() { return quantize_input(1.0f, 2); }\n")
    subprocess.run(["g++", "-fsyntax-only", str(source)], check=True)


def test_affine_over_other_axes_stays_as_int8_ops(rng):
    # One mean per pixel and channel: not a per-channel affine, so it runs as
    # int8 MUL/ADD on an input tensor in raw units.
    x = rng.normal(100.0, 20.0, (48, 6, 6, 3)).astype("float32")
    x += np.linspace(0, 50, 6)[None, :, None, None].astype("float32")
    norm = keras.layers.Normalization(axis=(1, 2, 3))
    norm.adapt(x)
    model = _model(norm)
    result = kmt.convert(model, "mcu", x, verbose=0)
    feed = result.report["input"]
    assert feed["preprocessing"]["folded"] is False
    assert {"MUL", "ADD"} <= set(result.ops)
    assert feed["zero_point_is_integer"]  # The model's input is in raw units.
    detail = runtimes.io_details(result.tflite)[0][0]
    assert feed["scale"] == pytest.approx(detail["quantization"][0])
    _assert_matches_float(model, result, x)
    entry = input_metadata.read(result.tflite)
    assert entry["metadata"]["version"] == 1
    assert entry["preprocessing"]["ops"] == ["MUL", "ADD"]


@pytest.fixture(scope="module")
def wine():
    """scikit-learn's wine: 13 raw features from hue (about 0.5-1.7) to proline
    (about 300-1700), a Normalization layer first, trained in float:
    (model, (x, y) train, (x, y) test, float test accuracy)."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    x = x.astype("float32")
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    keras.utils.set_random_seed(0)
    norm = keras.layers.Normalization()
    norm.adapt(x[:100])
    model = keras.Sequential(
        [
            keras.Input((13,)),
            norm,
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x[:100], y[:100], epochs=60, batch_size=16, verbose=0)
    test = (x[100:], y[100:])
    float_accuracy = model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]
    assert float_accuracy >= 0.9
    return model, (x[:100], y[:100]), test, float_accuracy


def test_wine_features_in_their_own_units_keep_float_accuracy(wine):
    """With the raw features in one int8 tensor (the Rescaling MUL this
    replaced) TFLite Micro scored 50% against 98.6% float; folded per channel
    it matches float."""
    model, (x, _), test, float_accuracy = wine
    result = kmt.convert(model, "mcu", x, verbose=0)
    device = kmt.evaluate(result, *test, runtime="tflm")["accuracy"]
    assert device >= float_accuracy - 0.02, (device, float_accuracy)


def test_qat_quantizes_the_folded_preprocessing_output_not_raw_input(wine):
    """QAT simulates the device's int8 input, which is the Normalization's
    output once the converter folds it: a fake quantizer on the raw features
    (one scale for hue and proline) cost 10 pt in Keras and 30-45 pt in
    TFLite Micro. `quantize_model` also accepts the folded layer without
    `unsupported="float"`, and its copy keeps the adapted statistics (it
    normalized nothing before: 35% before training)."""
    model, (x, y), test, float_accuracy = wine
    qat = kmt.optimize.quantize_model(model)
    kinds = [type(layer).__name__ for layer in qat.layers]
    assert kinds[:3] == ["InputLayer", "Normalization", "ActivationQuantizer"], kinds
    qat.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    untrained = qat.evaluate(*test, verbose=0, return_dict=True)["accuracy"]
    assert untrained >= float_accuracy - 0.05, (untrained, float_accuracy)
    qat.fit(x, y, epochs=5, batch_size=16, verbose=0)
    result = kmt.convert(kmt.optimize.strip(qat), "mcu", x, verbose=0)
    assert result.report["input"]["preprocessing"]["folded"] is True
    device = kmt.evaluate(result, *test, runtime="tflm")["accuracy"]
    assert device >= float_accuracy - 0.02, (device, float_accuracy)


def test_input_type_is_checked(rng):
    model = _model(keras.layers.Rescaling(0.5))
    with pytest.raises(ValueError, match="input_type"):
        kmt.convert(model, "mcu", _pixels(rng), input_type="float16", verbose=0)
    with pytest.raises(ValueError, match="microcontroller targets"):
        kmt.convert(model, "mobile-int8", _pixels(rng), input_type="uint8")


def test_int16_input_keeps_resolution_of_unequal_channels(rng):
    # Channels whose raw ranges differ 20x: an int8 raw input leaves the narrow
    # channel a handful of levels; TFLite's 16x8 mode (int16 input) does not.
    x = rng.normal([0.0, 100.0, -50.0], [1.0, 20.0, 5.0], (48, 6, 6, 3))
    x = x.astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = _model(norm)
    result = kmt.convert(model, "mcu", x, input_type="int16", verbose=0)
    assert result.report["input"]["dtype"] == "int16"
    assert result.report["conversion"]["input_type"] == "int16"
    expected = np.asarray(model(x))
    got = _device_outputs(result, x)
    np.testing.assert_allclose(got, expected, atol=0.01 * np.abs(expected).max())


def test_evaluate_feeds_raw_values_like_the_device(rng):
    model = _model(keras.layers.Rescaling(1 / 127.5, -1))
    x_raw = _pixels(rng, 64)
    y = np.asarray(model(x_raw)).argmax(axis=1)
    result = kmt.convert(model, "mcu", representative_data=x_raw, verbose=0)
    assert result.report["input"]["preprocessing"]["folded"]
    metrics = kmt.evaluate(result, x_raw, y, runtime="tflm")
    manual = _device_outputs(result, x_raw).argmax(axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(manual == y))
    assert metrics["accuracy"] >= 0.9
    # The .tflite alone says how raw values are fed (keras_microtune.input).
    from_file = kmt.evaluate(result.tflite, x_raw, y, runtime="tflm")
    assert from_file["accuracy"] == metrics["accuracy"]
