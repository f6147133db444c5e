"""Behaviour of the four stage layers: maths, validation, training, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_microtune as kmt
from keras_microtune import layers


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _classifier(input_shape=(16, 3), classes=3):
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.FeatureStage([8, 16], pooling="max"),
            layers.MicroTune(groups=4, activation="relu"),
            layers.EmbeddingStage("avg", units=8),
            layers.OutputStage(classes, dropout=0.1),
        ]
    )


def _data(rng, n=32, shape=(16, 3), classes=3):
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = (x.mean(axis=tuple(range(1, x.ndim))) > 0).astype("int32") % classes
    return x, y


@pytest.mark.parametrize(
    "width, groups, rank, expected",
    [
        (96, 4, None, 96 * 96 // 4 + 96),
        (96, 1, None, 96 * 96 + 96),
        (64, 4, 2, 2 * 64 * 2 + 64),
        (64, 2, 8, 2 * 64 * 8 + 64),
    ],
)
def test_microtune_parameter_count(width, groups, rank, expected):
    layer = layers.MicroTune(groups=groups, rank=rank)
    layer.build((None, width))
    assert layer.count_params() == expected


@pytest.mark.parametrize(
    "kwargs", [{}, {"rank": 2}, {"merge": "sum"}, {"activation": "relu"}]
)
def test_microtune_is_identity_at_initialisation(kwargs, rng):
    x = rng.normal(size=(3, 5, 8)).astype("float32")
    np.testing.assert_array_equal(_np(layers.MicroTune(groups=2, **kwargs)(x)), x)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_microtune_matches_numpy_reference(merge, rng):
    layer = layers.MicroTune(groups=2, merge=merge, activation="relu")
    layer.build((None, 6))
    kernel = rng.normal(size=(2, 3, 3)).astype("float32")
    bias = rng.normal(size=(6,)).astype("float32")
    layer.set_weights([kernel, bias])
    x = rng.normal(size=(4, 6)).astype("float32")
    a = np.maximum(x, 0)
    parts = [a[:, :3], a[:, 3:]]
    if merge == "sum":
        parts = [parts[0] + parts[1]] * 2
    branch = np.concatenate([p @ k for p, k in zip(parts, kernel)], axis=-1) + bias
    np.testing.assert_allclose(_np(layer(x)), x + branch, rtol=1e-5, atol=1e-5)


def test_microtune_low_rank_matches_reference(rng):
    layer = layers.MicroTune(groups=2, rank=1)
    layer.build((None, 4))
    down = rng.normal(size=(2, 2, 1)).astype("float32")
    up = rng.normal(size=(2, 1, 2)).astype("float32")
    layer.set_weights([down, up, np.zeros(4, "float32")])
    x = rng.normal(size=(3, 4)).astype("float32")
    ref = np.concatenate([x[:, :2] @ down[0] @ up[0], x[:, 2:] @ down[1] @ up[1]], -1)
    np.testing.assert_allclose(_np(layer(x)), x + ref, rtol=1e-5, atol=1e-5)


def test_embedding_stage_reductions(rng):
    x = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    np.testing.assert_allclose(
        _np(layers.EmbeddingStage("avg")(x)), x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(_np(layers.EmbeddingStage("max")(x)), x.max(axis=(1, 2)))
    np.testing.assert_allclose(
        _np(layers.EmbeddingStage("flatten")(x)), x.reshape(2, -1), rtol=1e-6
    )
    seq = x[:, 0]
    np.testing.assert_allclose(_np(layers.EmbeddingStage("max")(seq)), seq.max(axis=1))
    l2 = _np(layers.EmbeddingStage("avg", normalize="l2")(x))
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1.0, rtol=1e-5)


def test_feature_stage_same_config_on_sequences_and_images(rng):
    config = {"filters": [4, 6], "strides": [1, 2], "pooling": "avg"}
    seq = layers.FeatureStage(**config)(rng.normal(size=(2, 20, 3)).astype("float32"))
    img = layers.FeatureStage(**config)(
        rng.normal(size=(2, 20, 20, 3)).astype("float32")
    )
    assert tuple(seq.shape) == (2, 3, 6)
    assert tuple(img.shape) == (2, 3, 3, 6)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: layers.MicroTune(groups=0), r"`groups`.*Received: groups=0"),
        (lambda: layers.MicroTune(rank=0), r"`rank`.*Received: rank=0"),
        (lambda: layers.MicroTune(merge="mean"), r"`merge`.*Received: merge='mean'"),
        (lambda: layers.MicroTune(activation="nope"), r"nope"),
        (
            lambda: layers.MicroTune(groups=5)(np.zeros((1, 96), "float32")),
            r"divisor of the input width 96.*Received: groups=5",
        ),
        (lambda: layers.MicroTune()(np.zeros((4,), "float32")), r"rank >= 2"),
        (lambda: layers.FeatureStage(filters=[]), r"`filters`"),
        (lambda: layers.FeatureStage(activation="gelu"), r"`activation`.*gelu"),
        (lambda: layers.FeatureStage(pooling="sum"), r"`pooling`.*sum"),
        (lambda: layers.FeatureStage(filters=[4, 4], strides=[1]), r"one per block"),
        (lambda: layers.FeatureStage()(np.zeros((2, 3), "float32")), r"3-D .* or 4-D"),
        (lambda: layers.EmbeddingStage(pooling="median"), r"`pooling`.*median"),
        (lambda: layers.EmbeddingStage(units=0), r"`units`.*Received: units=0"),
        (lambda: layers.EmbeddingStage(normalize="l1"), r"`normalize`"),
        (lambda: layers.EmbeddingStage()(np.zeros((2, 3), "float32")), r"pooling=None"),
        (lambda: layers.OutputStage(0), r"`units`.*Received: units=0"),
        (lambda: layers.OutputStage(2, activation="tanh"), r"`activation`.*tanh"),
        (lambda: layers.OutputStage(2, dropout=1.5), r"`dropout`.*1.5"),
        (
            lambda: layers.OutputStage(2)(np.zeros((2, 3, 4), "float32")),
            r"EmbeddingStage before it",
        ),
    ],
)
def test_invalid_configurations_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_keras_save_load_round_trip_is_bit_exact(tmp_path, rng):
    x, y = _data(rng)
    model = _classifier()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    assert [type(layer) for layer in loaded.layers] == [
        type(layer) for layer in model.layers
    ]


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.features = layers.FeatureStage([8])
        self.adapter = layers.MicroTune(groups=2)
        self.embedding = layers.EmbeddingStage("avg")
        self.head = layers.OutputStage(3)

    def call(self, x, training=None):
        return self.head(self.embedding(self.adapter(self.features(x))))


def _functional():
    inputs = keras.Input((16, 3))
    x = layers.FeatureStage([8])(inputs)
    x = layers.MicroTune(groups=2, rank=2)(x)
    x = layers.EmbeddingStage("flatten", units=4)(x)
    return keras.Model(inputs, layers.OutputStage(3)(x))


@pytest.mark.parametrize("make", [_classifier, _functional, Subclassed])
def test_fit_reduces_loss_in_every_model_style(make, rng):
    x, y = _data(rng, n=64)
    model = make()
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_mixed_precision_fit(rng):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data(rng)
    model = _classifier()
    assert model.layers[0].compute_dtype == "float16"
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.layers[1].kernel.dtype == "float32"  # variables stay float32


def test_fit_under_mirrored_strategy(rng, mirrored):
    assert len(tf.config.list_logical_devices("CPU")) == 2
    strategy = mirrored
    x, y = _data(rng)
    with strategy.scope():
        model = _classifier()
        model.compile("adam", "sparse_categorical_crossentropy")
    before = model.layers[1].get_weights()[0].copy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert strategy.num_replicas_in_sync == 2
    assert not np.array_equal(model.layers[1].get_weights()[0], before)


def test_public_paths_are_the_same_classes():
    assert kmt.MicroTune is layers.MicroTune
    config = keras.saving.serialize_keras_object(layers.MicroTune(groups=2))
    assert config["registered_name"] == "keras_microtune>MicroTune"
