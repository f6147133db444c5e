"""MobileNetV2-0.35 at 96x96 for `mcu` and each mobile target, on the real runtimes."""

import json

import keras
import numpy as np
import pytest

import keras_microtune as kmt

from .conftest import DYNAMIC_OPS


@pytest.mark.slow
def test_mobilenet_v2_035_96(tmp_path):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        alpha=0.35,
        weights=None,
        input_shape=(96, 96, 3),
        classes=10,
        classifier_activation=None,  # Untrained logits overflow int8 SOFTMAX.
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (24, 96, 96, 3)).astype("float32")
    figures = {}
    mcu = kmt.convert(
        model, "mcu", representative_data=x[:16], validation_data=x[16:], verbose=0
    )
    assert not set(mcu.ops) & DYNAMIC_OPS
    assert mcu.parity["tflm_matches_litert"], mcu.parity
    assert mcu.parity["cosine"] > 0.9, mcu.parity
    lower = mcu.report["memory"]["activation_lower_bound_bytes"]
    assert lower <= mcu.arena_bytes < 3 * lower
    # The plain TFLiteConverter int8 path, for the size comparison.
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[i : i + 1]] for i in range(16))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    plain = conv.convert()
    assert mcu.size_bytes < len(plain)
    figures["mcu"] = {
        "size_bytes": mcu.size_bytes,
        "plain_converter_size_bytes": len(plain),
        "arena_bytes": mcu.arena_bytes,
        "lower_bound_bytes": lower,
        "parity": mcu.parity,
    }
    for target in ("mobile-int8", "mobile-float16", "mobile-dynamic", "float32"):
        result = kmt.convert(
            model, target, representative_data=x[:8], validation_data=x[16:], verbose=0
        )
        assert result.parity["cosine"] > 0.9, (target, result.parity)
        figures[target] = {"size_bytes": result.size_bytes, "parity": result.parity}
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
