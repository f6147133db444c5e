"""Verification tolerates TFLite Micro's FULLY_CONNECTED rounding difference only."""

import keras

import keras_microtune as kmt
from keras_microtune.export import parity


def test_feature_map_adapter_verifies_within_tolerance(rng):
    model = keras.Sequential([keras.Input((4, 4, 32)), kmt.layers.MicroTune(groups=2)])
    model.set_weights(
        [0.2 * rng.normal(size=w.shape).astype("float32") for w in model.get_weights()]
    )
    x = rng.normal(size=(64, 4, 4, 32)).astype("float32")
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    p = result.parity
    assert p["tflm_max_abs_diff"] <= parity.TFLM_TOLERANCE_STEPS
    assert p["tflm_within_tolerance"] and result.report["verified"]
    assert p["tflm_matches_litert"] == (p["tflm_max_abs_diff"] == 0)
    assert "ADD" in result.ops and "FULLY_CONNECTED" in result.ops


def test_larger_differences_fail_verification(monkeypatch, rng):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    x = rng.normal(size=(32, 8)).astype("float32")
    monkeypatch.setattr(parity, "TFLM_TOLERANCE_STEPS", -1)
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    assert not result.parity["tflm_within_tolerance"]
    assert not result.report["verified"]
