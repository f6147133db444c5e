import os
import sys

import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.optimize import tfmot_bridge

tf_keras = pytest.importorskip("tf_keras")


def _tf_keras_model():
    return tf_keras.Sequential(
        [
            tf_keras.Input((8, 8, 1)),
            tf_keras.layers.Conv2D(4, 3, activation="relu"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(3),
        ]
    )


def test_detection_does_not_import_tf_keras_for_keras3():
    import keras

    assert not tfmot_bridge.is_tf_keras_model(keras.Sequential([keras.Input((2,))]))
    assert tfmot_bridge.is_tf_keras_model(_tf_keras_model())


def test_quantize_routes_to_tfmot_without_leaking_env(rng):
    saved = os.environ.get("TF_USE_LEGACY_KERAS")
    qat = kmt.optimize.quantize_model(_tf_keras_model())
    assert os.environ.get("TF_USE_LEGACY_KERAS") == saved
    assert "tensorflow_model_optimization" in sys.modules
    assert isinstance(qat, tf_keras.Model)
    assert any(layer.name.startswith("quant_") for layer in qat.layers)
    qat.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(rng.normal(size=(8, 8, 8, 1)), np.arange(8) % 3, verbose=0)


def test_prune_and_strip_route_to_tfmot(rng):
    pruned = kmt.optimize.prune_low_magnitude(
        _tf_keras_model(), target_sparsity=0.5, end_step=2, frequency=1
    )
    pruned.compile(
        "adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    pruned.fit(
        rng.normal(size=(16, 8, 8, 1)),
        np.arange(16) % 3,
        batch_size=4,
        verbose=0,
        callbacks=[tfmot_bridge.update_pruning_step_callback()],
    )
    stripped = kmt.optimize.strip(pruned)
    kernel = stripped.layers[-1].get_weights()[0]
    assert (kernel == 0).mean() == pytest.approx(0.5, abs=0.05)
