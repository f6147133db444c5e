"""Preprocessing shipped with the model: Rescaling/Normalization fed raw values."""

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


def test_per_channel_normalization_stays_as_int8_ops(rng):
    x = rng.normal([0.0, 100.0, -50.0], [10.0, 20.0, 5.0], (48, 6, 6, 3))
    x = x.astype("float32")
    norm = keras.layers.Normalization()
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
    entry = input_metadata.read(result.tflite)  # The file says what it runs.
    assert entry == feed and entry["preprocessing"]["ops"] == ["MUL", "ADD"]
    assert len(entry["preprocessing"]["scale"]) == 3


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
