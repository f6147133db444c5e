"""Inner adapters (Keras LoRA) and bias/norm training placed by attach()."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune import layers
from keras_microtune.adapters import apply_placement


def _stages():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.FeatureStage([8], stem_filters=4, pooling="max", name="b1"),
            layers.FeatureStage([8, 8], name="b2"),
            layers.EmbeddingStage("avg", units=8, activation="relu", name="emb"),
            layers.OutputStage(3, name="out"),
        ],
        name="stages",
    )


def _cnn():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(6, 1, use_bias=False, name="conv2")(x)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(x), name="cnn")


def _paths(variables):
    return sorted(
        v.path.removeprefix("stages/").removeprefix("cnn/") for v in variables
    )


def _pretrained(make, rng):
    model = make()
    x = rng.normal(size=(16, *model.inputs[0].shape[1:])).astype("float32")
    model.compile("adam", "mse")  # moves BatchNorm statistics off their init
    model.fit(x, rng.normal(size=(16, 3)), epochs=1, verbose=0)
    return model, x


FORMS = {
    "lora": {"lora": "auto"},
    "lora_dict": {"lora": {"b2/block1_pw": 2, "b1": 3}},
    "bias": {"train_bias": True},
    "norm": {"train_norm": True},
    "all": {"lora": "auto", "lora_rank": 2, "train_bias": True, "train_norm": True},
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_identity_at_init_for_every_form(form, rng):
    model, x = _pretrained(_stages, rng)
    adapted = kmt.attach(model, adapters=None, **FORMS[form])
    np.testing.assert_array_equal(
        adapted.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    assert not any(
        getattr(x, "lora_enabled", False) for x in model._flatten_layers()
    ), "attach must not mutate its input"


def test_trainable_weights_are_exactly_the_placement(rng):
    model, x = _pretrained(_stages, rng)
    adapted = kmt.attach(
        model,
        num_classes=2,
        adapters=None,
        lora={"b2/block1_pw": 2, "b1": 3},
        train_bias="b2",
        train_norm=["b1/stem_bn"],
    )
    expected = [
        "b1/block0_pw/lora_kernel_a",
        "b1/block0_pw/lora_kernel_b",
        "b1/stem_bn/beta",
        "b1/stem_bn/gamma",
        "b1/stem_conv/lora_kernel_a",
        "b1/stem_conv/lora_kernel_b",
        "b2/block0_dw_bn/beta",
        "b2/block0_pw_bn/beta",
        "b2/block1_dw_bn/beta",
        "b2/block1_pw/lora_kernel_a",
        "b2/block1_pw/lora_kernel_b",
        "b2/block1_pw_bn/beta",
        "classifier/dense/bias",
        "classifier/dense/kernel",
    ]
    assert _paths(adapted.trainable_weights) == expected
    assert adapted.get_layer("b2").get_config()["lora_rank"] == {"block1_pw": 2}
    assert adapted.get_layer("b1").get_config()["lora_rank"] == {
        "stem_conv": 3,
        "block0_pw": 3,
    }
    # `fit` changes exactly these (BatchNorm moving statistics stay frozen).
    before = {v.path: np.array(v.numpy()) for v in adapted.weights}
    adapted.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    adapted.fit(x, rng.integers(0, 2, 16), epochs=2, batch_size=8, verbose=0)
    changed = [v for v in adapted.weights if not np.array_equal(before[v.path], v)]
    assert _paths(changed) == expected


def test_functional_cnn_bias_norm_lora_and_batchnorm_inference_mode(rng):
    model, x = _pretrained(_cnn, rng)
    adapted = kmt.attach(
        model, adapters=None, lora=["conv2"], train_bias=["conv1"], train_norm=True
    )
    assert _paths(adapted.trainable_weights) == [
        "bn1/beta",
        "bn1/gamma",
        "conv1/bias",
        "conv2/lora_kernel_a",
        "conv2/lora_kernel_b",
        "dense/bias",  # the kept head stays trainable, as before
        "dense/kernel",
        "ln/beta",
        "ln/gamma",
    ]
    bn = adapted.get_layer("bn1")
    # BatchNorm normalises with its moving statistics even in training mode.
    np.testing.assert_allclose(
        adapted(x, training=True), adapted(x, training=False), rtol=1e-6
    )
    stats = [w.copy() for w in bn.get_weights()[2:]]
    adapted.compile(keras.optimizers.Adam(0.05), "mse")
    adapted.fit(x, rng.normal(size=(16, 3)), epochs=2, verbose=0)
    for a, b in zip(bn.get_weights()[2:], stats):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        bn.get_weights()[0], model.get_layer("bn1").get_weights()[0]
    )


def test_keras_round_trip_and_configs(tmp_path, rng):
    model, x = _pretrained(_stages, rng)
    adapted = kmt.attach(model, lora="b2", train_norm=True, adapters=None)
    adapted.compile(keras.optimizers.Adam(0.05), "mse")
    adapted.fit(x, rng.normal(size=(16, 3)), epochs=2, verbose=0)
    assert np.abs(adapted.get_layer("b2")._blocks[0][3].lora_kernel_b.numpy()).sum() > 0
    path = tmp_path / "m.keras"
    adapted.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), adapted.predict(x, verbose=0)
    )
    config = adapted.get_layer("b2").get_config()
    assert config["lora_rank"] == {"block0_pw": 4, "block1_pw": 4}
    assert loaded.get_layer("b2").get_config() == config
    # PrefixCacheModel's config keeps the per-variable choices: the reloaded
    # model trains the same variables (LoRA itself is saved merged; see
    # tests/test_lora_resume.py for its factors).
    assert _paths(loaded.trainable_weights) == _paths(adapted.trainable_weights)


def test_stage_lora_rank_argument(rng):
    stage = layers.FeatureStage([4, 4], stem_filters=4, lora_rank=[None, 2])
    assert stage.get_config()["lora_rank"] == {"block1_pw": 2}
    stage(np.zeros((1, 8, 8, 1), "float32"))
    assert [v.name for v in stage.trainable_weights if "lora" in v.name] == [
        "lora_kernel_a",
        "lora_kernel_b",
    ]
    assert (
        layers.FeatureStage(4, stem_filters=2, lora_rank=3).lora_rank_of("stem_conv")
        == 3
    )
    with pytest.raises(ValueError, match=r"`lora_rank`.*depthwise.*block0_dw"):
        layers.FeatureStage(4, lora_rank={"block0_dw": 2})
    with pytest.raises(ValueError, match=r"`lora_rank`.*list of 2 ints"):
        layers.FeatureStage([4, 4], lora_rank=[1])
    with pytest.raises(ValueError, match=r"`lora_rank`.*positive"):
        layers.OutputStage(3, lora_rank=0)
    emb = layers.EmbeddingStage(units=4, lora_rank=2)
    emb(np.zeros((1, 3, 3, 2), "float32"))
    assert emb.projection.lora_enabled
    assert layers.EmbeddingStage.from_config(emb.get_config()).lora_rank == 2


def test_placement_errors(rng):
    model, _ = _pretrained(_cnn, rng)
    with pytest.raises(ValueError, match=r"'nope'.*Available layers: \[.*'conv1'"):
        kmt.attach(model, lora="nope")
    with pytest.raises(ValueError, match=r"`lora`: layer 'bn1' has no Dense or Conv"):
        kmt.attach(model, lora="bn1")
    with pytest.raises(ValueError, match=r"`lora_rank`.*Received: lora_rank=0"):
        kmt.attach(model, lora="conv1", lora_rank=0)
    with pytest.raises(ValueError, match=r"`train_bias`.*Received: train_bias=3"):
        kmt.attach(model, train_bias=3)
    stages, _ = _pretrained(_stages, rng)
    with pytest.raises(ValueError, match=r"'b1' has no sublayer 'nope'"):
        kmt.attach(stages, lora="b1/nope")
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        apply_placement(stages, {"bogus": []})
