"""Verification tolerates TFLite Micro's one-step rounding difference, no more."""

import keras
import numpy as np

import keras_microtune as kmt
from keras_microtune.export import parity


def test_feature_map_adapter_verifies_within_one_step(rng):
    model = keras.Sequential([keras.Input((4, 4, 32)), kmt.layers.MicroTune(groups=2)])
    model.set_weights(
        [0.2 * rng.normal(size=w.shape).astype("float32") for w in model.get_weights()]
    )
    x = rng.normal(size=(64, 4, 4, 32)).astype("float32")
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    p = result.parity
    assert p["tflm_max_abs_diff"] <= parity.TFLM_TOLERANCE_STEPS
    assert p["tflm_within_one_step"] and result.report["verified"]
    assert p["tflm_matches_litert"] == (p["tflm_max_abs_diff"] == 0)
    assert "ADD" in result.ops and "FULLY_CONNECTED" in result.ops
