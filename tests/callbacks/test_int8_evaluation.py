"""Int8Evaluation logs the TFLite Micro accuracy of the int8 model during fit."""

import math

import keras
import numpy as np
import pytest

import keras_microtune as kmt


def test_logs_int8_accuracy_every_n_epochs(rng):
    x = rng.uniform(0, 255, (64, 8)).astype("float32")
    y = (x[:, 0] > x[:, 1]).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    callback = kmt.callbacks.Int8Evaluation(x[:32], y[:32], every=2)
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    logs = history.history["int8_accuracy"]
    assert math.isnan(logs[0]) and 0.0 <= logs[1] <= 1.0
    float_acc = kmt.evaluate(model, x[:32], y[:32])["accuracy"]
    assert abs(logs[1] - float_acc) <= 0.1
    assert callback.metrics["runtime"] == "tflm" and callback.seconds > 0


def test_converts_a_model_named_as_tensorflow_rejects(rng):
    """Issue 18: names like "my model" train eagerly (run_eagerly=True) and
    convert at epoch end under sanitized names."""
    x = rng.normal(size=(32, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, activation="relu", name="dense 1")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="sortie (v2)")(hidden)
    model = keras.Model(inputs, outputs, name="my model")
    model.compile("adam", "sparse_categorical_crossentropy", run_eagerly=True)
    callback = kmt.callbacks.Int8Evaluation(x, y)
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    float_acc = kmt.evaluate(model, x, y)["accuracy"]
    assert abs(history.history["int8_accuracy"][0] - float_acc) <= 0.1
    assert [layer.name for layer in model.layers[1:]] == ["dense 1", "sortie (v2)"]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        kmt.callbacks.Int8Evaluation(np.zeros((2, 3)), np.zeros(2), every=0)
    with pytest.raises(ValueError, match="TFLite Micro target"):
        kmt.callbacks.Int8Evaluation(np.zeros((2, 3)), np.zeros(2), target="float32")
