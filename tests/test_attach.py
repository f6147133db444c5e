"""attach(): adapters, head replacement, freezing, and no mutation of the input."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune import layers


def _backbone(classes=5):
    return keras.Sequential(
        [
            keras.Input((16, 3)),
            layers.FeatureStage([8, 16]),
            layers.EmbeddingStage(),
            layers.OutputStage(classes),
        ]
    )


def _functional_cnn():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(name="relu1")(x)
    y = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.Add(name="add1")([x, y])
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))


def _mobilenet():
    return keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10
    )


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _features(model, x):
    """Output of the layer before the head (the embedding input)."""
    extractor = keras.Model(model.inputs, model.get_layer("embedding").input)
    return extractor.predict(x, verbose=0)


@pytest.mark.parametrize(
    "make, shape", [(_backbone, (16, 3)), (_functional_cnn, (12, 12, 3))]
)
def test_outputs_unchanged_before_training_and_input_not_mutated(make, shape, rng):
    model = make()
    x = rng.normal(size=(4, *shape)).astype("float32")
    before = model.predict(x, verbose=0)
    weights = [w.copy() for w in model.get_weights()]
    flags = [layer.trainable for layer in model.layers]
    n_layers = len(model.layers)

    adapted = kmt.attach(model, adapters="auto")
    assert any(isinstance(layer, kmt.MicroTune) for layer in adapted.layers)
    np.testing.assert_array_equal(adapted.predict(x, verbose=0), before)
    # the input model is untouched
    assert len(model.layers) == n_layers
    assert [layer.trainable for layer in model.layers] == flags
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    assert not any(v is w for v in adapted.weights for w in model.weights)


def test_new_head_and_features_equal_the_original(rng):
    model = _functional_cnn()
    x = rng.normal(size=(3, 12, 12, 3)).astype("float32")
    adapted = kmt.attach(model, num_classes=7, adapters="auto")
    assert adapted.output_shape == (None, 7)
    reference = keras.Model(model.inputs, model.get_layer("relu2").output)
    np.testing.assert_array_equal(
        _features(adapted, x), reference.predict(x, verbose=0)
    )
    # auto: after the last two block ends (add1 is followed by relu2)
    names = [layer.name for layer in adapted.layers if isinstance(layer, kmt.MicroTune)]
    assert names == ["add1_microtune", "relu2_microtune"]


def test_backbone_frozen_adapters_and_head_train(rng):
    model = _functional_cnn()
    adapted = kmt.attach(model, num_classes=3, adapters="auto")
    x = rng.normal(size=(32, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 3, size=32)
    frozen = {
        layer.name: [w.copy() for w in layer.get_weights()]
        for layer in adapted.layers
        if layer.weights and not layer.trainable
    }
    assert "batch_normalization" in "".join(frozen)
    adapted.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    adapted.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for name, weights in frozen.items():  # includes BN moving statistics
        for a, b in zip(adapted.get_layer(name).get_weights(), weights):
            np.testing.assert_array_equal(a, b)
    adapter = adapted.get_layer("relu2_microtune")
    assert np.abs(adapter.get_weights()[0]).sum() > 0


def test_named_adapters_and_errors():
    model = _functional_cnn()
    adapted = kmt.attach(model, adapters=["relu1"], groups=2, rank=1)
    adapter = adapted.get_layer("relu1_microtune")
    assert (adapter.groups, adapter.rank) == (2, 1)
    with pytest.raises(ValueError, match=r"'nope'.*Available layers: \[.*'relu1'"):
        kmt.attach(model, adapters="nope")
    with pytest.raises(ValueError, match=r"divisor of the input width 8"):
        kmt.attach(model, adapters=["relu1"], groups=3)
    with pytest.raises(ValueError, match=r"`num_classes`.*Received: num_classes=0"):
        kmt.attach(model, num_classes=0)
    with pytest.raises(ValueError, match=r"`rank`"):
        kmt.attach(model, rank=-1)


def test_subclassed_and_non_models_are_refused():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match=r"subclassed model 'Net'.*Functional"):
        kmt.attach(Net())
    with pytest.raises(TypeError, match=r"expects a keras.Model"):
        kmt.attach("model.keras")


def test_multi_output_model_adapters_only():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, activation="relu", name="shared")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2)(h), keras.layers.Dense(3)(h)])
    with pytest.raises(ValueError, match=r"single-output model.*2 outputs"):
        kmt.attach(model, num_classes=2)
    adapted = kmt.attach(model, adapters=["shared"], groups=2)
    assert len(adapted.outputs) == 2


def test_nested_backbone_and_custom_head(rng):
    backbone = keras.Sequential(
        [keras.Input((16, 3)), layers.FeatureStage([8, 16])], name="backbone"
    )
    inputs = keras.Input((16, 3))
    x = keras.layers.GlobalAveragePooling1D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))
    head = keras.Sequential([keras.layers.GlobalMaxPooling1D(), keras.layers.Dense(2)])
    adapted = kmt.attach(model, head=head)
    assert adapted.output_shape == (None, 2)
    assert adapted.get_layer("backbone_microtune").groups == 4
    assert not adapted.get_layer("backbone").trainable
    xs = rng.normal(size=(2, 16, 3)).astype("float32")
    assert adapted.predict(xs, verbose=0).shape == (2, 2)


def test_mobilenet_v2_trainable_fraction(rng):
    model = _mobilenet()
    adapted = kmt.attach(model, num_classes=4, adapters="auto")
    trainable = _trainable_count(adapted)
    fraction = trainable / model.count_params()
    assert fraction < 0.05, (trainable, fraction)
    names = [layer.name for layer in adapted.layers if isinstance(layer, kmt.MicroTune)]
    assert names == ["block_14_add_microtune", "block_15_add_microtune"]
    x = rng.normal(size=(1, 96, 96, 3)).astype("float32")
    reference = keras.Model(model.inputs, model.get_layer("out_relu").output)
    np.testing.assert_array_equal(
        _features(adapted, x), reference.predict(x, verbose=0)
    )
    adapted.summary(print_fn=lambda *a, **k: None)


def test_default_placement_lora_bias_norm_and_identity(rng):
    model = _functional_cnn()
    x = rng.normal(size=(16, 12, 12, 3)).astype("float32")
    adapted = kmt.attach(model, num_classes=3)
    assert not any(isinstance(layer, kmt.MicroTune) for layer in adapted.layers)
    # lora="all": every kernel before the head (both convs), rank 2.
    convs = [x for x in adapted.layers if isinstance(x, keras.layers.Conv2D)]
    assert len(convs) == 2 and all(x.lora_enabled and x.lora_rank == 2 for x in convs)
    bn = next(
        x for x in adapted.layers if isinstance(x, keras.layers.BatchNormalization)
    )
    trainable = {id(v) for v in adapted.trainable_weights}
    assert id(bn.beta) in trainable  # Biases train, norm scales do not.
    assert not {id(bn.gamma), id(bn.moving_mean), id(bn.moving_variance)} & trainable
    # LoRA A, B of both convs, their biases, BN beta, the 8 -> 3 head.
    lora = (3 * 3 * 3 * 2 + 2 * 8) + (3 * 3 * 8 * 2 + 2 * 8)
    assert _trainable_count(adapted) == lora + 2 * 8 + 8 + (8 * 3 + 3)
    reference = keras.Model(model.inputs, model.get_layer("relu2").output)
    np.testing.assert_allclose(
        _features(adapted, x), reference.predict(x, verbose=0), atol=1e-6
    )
    # groups alone still asks for MicroTune, as before.
    grouped = kmt.attach(model, num_classes=3, groups=2)
    assert [x.name for x in grouped.layers if isinstance(x, kmt.MicroTune)] == [
        "add1_microtune",
        "relu2_microtune",
    ]


def test_adapted_normalization_is_kept_by_the_copy():
    """attach() copies the backbone; an adapted Normalization's copy must keep
    its statistics (`set_weights` alone left it at mean 0, variance 1 and the
    attached model 178 away from the backbone's outputs)."""
    x = (np.random.default_rng(0).random((64, 6)) * 100 + 50).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    backbone = keras.Sequential(
        [keras.Input((6,)), norm, keras.layers.Dense(8, "relu"), keras.layers.Dense(3)]
    )
    model = kmt.attach(backbone)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), backbone.predict(x, verbose=0), atol=1e-4
    )
