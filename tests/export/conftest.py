"""Small models for the export tests, converted once per session."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune import layers as kl

DYNAMIC_OPS = {"SHAPE", "STRIDED_SLICE", "PACK", "READ_VARIABLE", "VAR_HANDLE"}


def _separable(shape, n=96, classes=3, seed=0):
    """Inputs whose class is set by the sign pattern of their mean: learnable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 0.5, (n, *shape)).astype("float32")
    x[..., 0] += (y - 1).reshape((-1,) + (1,) * (len(shape) - 1)) * 1.5
    return x, y.astype("int32")


def _fit(model, x, y, epochs=3):
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def stage_model():
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            kl.FeatureStage([8, 16], pooling="max"),
            kl.EmbeddingStage("avg", units=16),
            kl.MicroTune(groups=4, activation="relu"),
            kl.OutputStage(3),
        ],
        name="stages",
    )


def ds_cnn():
    inp = keras.Input((20, 10, 1))
    x = keras.layers.Conv2D(16, (5, 3), strides=2, padding="same", use_bias=False)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    for _ in range(2):
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Conv2D(16, 1, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.AveragePooling2D(x.shape[1:3])(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inp, out, name="ds_cnn")


def conv1d():
    return keras.Sequential(
        [
            keras.Input((32, 6)),
            keras.layers.Conv1D(8, 5, activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Conv1D(16, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, activation="softmax"),
        ],
        name="conv1d",
    )


def residual():
    inp = keras.Input((12, 12, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same")(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inp, out, name="residual")


BUILDERS = {
    "stages": stage_model,
    "ds_cnn": ds_cnn,
    "conv1d": conv1d,
    "residual": residual,
}


@pytest.fixture(scope="session")
def trained():
    """name -> (model, x, y), each trained briefly so classes are meaningful."""
    out = {}
    for name, build in BUILDERS.items():
        keras.utils.set_random_seed(0)
        model = build()
        x, y = _separable(tuple(model.inputs[0].shape[1:]))
        out[name] = (_fit(model, x, y), x, y)
    return out


@pytest.fixture(scope="session")
def mcu_results(trained):
    """name -> ConversionResult for the generic `mcu` target."""
    return {
        name: kmt.convert(
            model, "mcu", representative_data=x[:48], validation_data=(x, y), verbose=0
        )
        for name, (model, x, y) in trained.items()
    }
