"""The benchmark model zoo: MLPerf Tiny-style models built here with random weights.

No weights are downloaded: every model is built with `weights=None` or from
layers, and its BatchNorm statistics are set by one pass of training-mode
calls on the calibration data so that activations have realistic ranges.
"""

import keras
import numpy as np

import keras_microtune as kmt


def ds_cnn(classes=12):
    """DS-CNN keyword spotting (MLPerf Tiny KWS), 49x10 MFCC input."""
    inputs = keras.Input((49, 10, 1))
    x = keras.layers.Conv2D(64, (10, 4), strides=2, padding="same", use_bias=False)(
        inputs
    )
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for _ in range(4):
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        x = keras.layers.Conv2D(64, 1, use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="ds_cnn")


def resnet8(classes=10):
    """ResNet-8 (MLPerf Tiny image classification), 32x32x3 input."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same")(x)
        y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
        y = keras.layers.Conv2D(filters, 3, padding="same")(y)
        y = keras.layers.BatchNormalization()(y)
        if stride != 1:
            x = keras.layers.Conv2D(filters, 1, strides=stride)(x)
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.AveragePooling2D(8)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="resnet8")


def mobilenet_v1(alpha=0.25, size=96, classes=2):
    """MobileNetV1 (MLPerf Tiny visual wake words shape)."""
    return keras.applications.MobileNet(
        input_shape=(size, size, 3), alpha=alpha, weights=None, classes=classes
    )


def mobilenet_v2(alpha=0.35, size=96, classes=10):
    return keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, weights=None, classes=classes
    )


def autoencoder(inputs=640):
    """Fully-connected autoencoder (MLPerf Tiny anomaly detection)."""
    x = keras.Input((inputs,))
    h = x
    for units in (128, 128, 128, 128, 8, 128, 128, 128, 128):
        h = keras.layers.Dense(units)(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    return keras.Model(x, keras.layers.Dense(inputs)(h), name="fc_autoencoder")


def four_stages(classes=10):
    """A model made only of keras_microtune's four stages."""
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            kmt.layers.FeatureStage([16, 32, 64], strides=[2, 2, 2], stem_filters=8),
            kmt.layers.MicroTune(groups=4),
            kmt.layers.EmbeddingStage("avg", units=32),
            kmt.layers.OutputStage(classes),
        ],
        name="four_stages",
    )


ZOO = {
    "ds_cnn": ds_cnn,
    "resnet8": resnet8,
    "mobilenet_v1_0.25": mobilenet_v1,
    "fc_autoencoder": autoencoder,
    "mobilenet_v2_0.35": mobilenet_v2,
    "four_stages": four_stages,
}


def build(name, samples=32, seed=0):
    """Build a zoo model and calibration data; warm BatchNorm statistics."""
    keras.utils.set_random_seed(seed)
    model = ZOO[name]()
    rng = np.random.default_rng(seed)
    shape = model.input_shape[1:]
    x = rng.normal(size=(samples, *shape)).astype("float32")
    set_batchnorm_statistics(model, x)
    return model, x


def set_batchnorm_statistics(model, x):
    """Set every BatchNorm's moving mean and variance to its statistics on `x`.

    One training-mode call on all of `x` with momentum 0: each layer's moving
    statistics become those of its own input on `x` (the layers before it
    already normalised by the same statistics), so the model in inference
    mode computes what it computes in training mode on the batch `x`.
    Momentum is restored afterwards.
    """
    from keras_microtune.callbacks._base import sublayers

    layers = [
        layer
        for layer in sublayers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
