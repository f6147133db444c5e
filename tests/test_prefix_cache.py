"""fit on attach()'s model computes the frozen prefix once (PrefixCacheModel)."""

import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_microtune as kmt
from keras_microtune import layers
from keras_microtune.training import PrefixCacheModel
from keras_microtune.training.prefix_plan import plan_prefix

LOGGER = "keras_microtune.training.prefix_cache"


class SampleCounter(keras.layers.Layer):
    """Identity that counts the samples it has processed (in a variable)."""

    def build(self, input_shape):
        self.count = self.add_weight(
            name="count", shape=(), initializer="zeros", trainable=False
        )

    def call(self, inputs):
        self.count.assign_add(keras.ops.cast(keras.ops.shape(inputs)[0], "float32"))
        return inputs


def _backbone(counter=False, dropout=False):
    inputs = keras.Input((8, 8, 1))
    x = SampleCounter(name="counter")(inputs) if counter else inputs
    x = keras.layers.Dropout(0.2, name="drop")(x) if dropout else x
    x = layers.FeatureStage([16], stem_filters=8, pooling="max", name="block1")(x)
    x = layers.FeatureStage([16], name="block2")(x)
    x = layers.FeatureStage([16], name="block3")(x)
    x = layers.EmbeddingStage("avg")(x)
    return keras.Model(inputs, layers.OutputStage(3)(x), name="tiny")


def _branched():
    """Two frozen branches feed the trainable part: a cut of two tensors."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU(name="relu0")(x)
    a = keras.layers.ReLU(name="relu_a")(keras.layers.Conv2D(8, 3, padding="same")(x))
    b = keras.layers.ReLU(name="relu_b")(keras.layers.Conv2D(8, 1)(x))
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


@pytest.fixture
def data(rng):
    x = rng.random((48, 8, 8, 1)).astype("float32")
    return x, rng.integers(0, 3, 48).astype("int32")


def _train(backbone, x, y, cache, seed=1, attach_kwargs=None, **fit_kwargs):
    keras.utils.set_random_seed(seed)
    model = kmt.attach(backbone, **(attach_kwargs or {"num_classes": 3, "groups": 2}))
    model.cache_prefix = cache
    model.compile(
        keras.optimizers.Adam(1e-2),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    fit_kwargs = {"epochs": 3, "batch_size": 16, "shuffle": False, **fit_kwargs}
    fit_kwargs.setdefault("verbose", 0)
    history = model.fit(x, y, **fit_kwargs)
    return model, history


def _assert_same_training(a, b, history_a, history_b):
    assert history_a.history.keys() == history_b.history.keys()
    for key in history_a.history:
        np.testing.assert_allclose(
            history_a.history[key], history_b.history[key], rtol=1e-5, atol=1e-6
        )
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_cached_fit_matches_plain_fit(data, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = data
    backbone = _backbone()
    kwargs = {"validation_split": 0.25, "class_weight": {0: 2.0, 1: 1.0, 2: 1.0}}
    cached, h_cached = _train(backbone, x, y, True, **kwargs)
    plain, h_plain = _train(backbone, x, y, False, **kwargs)
    assert isinstance(cached, PrefixCacheModel)
    assert cached.history is h_cached
    assert set(h_cached.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    _assert_same_training(cached, plain, h_cached, h_plain)
    assert _messages(caplog)[0].startswith("Prefix cache: computed 2 frozen layers")
    np.testing.assert_allclose(
        cached.predict(x, verbose=0), plain.predict(x, verbose=0)
    )


def _count_train_traces(model):
    traces = []
    step = model.train_step

    def counted(data):
        traces.append(1)  # Python runs once per trace of the train function.
        return step(data)

    model.train_step = counted
    return traces


def test_uncached_fit_matches_keras_own_fit_and_traces_once(data):
    """Array data that is not cached is fed as one repeating dataset with the
    training state built first: the same training as `keras.Model.fit` on the
    same model, with the train step traced once (Keras' own traces it twice)."""
    x, y = data
    backbone = _backbone()
    runs = {}
    for name in ("ours", "keras"):
        keras.utils.set_random_seed(1)
        model = kmt.attach(backbone, num_classes=3)  # LoRA in block1: no prefix.
        model.compile(
            keras.optimizers.Adam(1e-2),
            "sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        traces = _count_train_traces(model)
        fit = (
            model.fit
            if name == "ours"
            else lambda *a, m=model, **k: keras.Model.fit(m, *a, **k)
        )
        history = fit(
            x,
            y,
            epochs=3,
            batch_size=16,
            shuffle=False,
            validation_split=0.25,
            verbose=0,
        )
        runs[name] = (model, history, len(traces))
    (ours, h_ours, n_ours), (plain, h_plain, n_plain) = runs["ours"], runs["keras"]
    assert not plan_prefix(ours).layers
    _assert_same_training(ours, plain, h_ours, h_plain)
    assert h_ours.params["steps"] == h_plain.params["steps"] == 3
    assert n_ours == 1 and n_plain >= n_ours


def test_inner_adapters_and_biases_train_and_end_the_prefix(data, caplog):
    """A frozen stage whose LoRA factors or biases train is not in the prefix:
    only the stages before it are cached, and training matches the plain fit."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = data
    backbone = _backbone()
    kwargs = {"num_classes": 3, "adapters": None, "lora": "block3"}
    kwargs["train_bias"] = ["block3"]
    cached, h_cached = _train(backbone, x, y, True, attach_kwargs=kwargs)
    plain, h_plain = _train(backbone, x, y, False, attach_kwargs=kwargs)
    assert {layer.name for layer in plan_prefix(cached).layers} == {
        "block1",
        "block2",
    }
    assert _messages(caplog)[0].startswith("Prefix cache: computed 2 frozen layers")
    _assert_same_training(cached, plain, h_cached, h_plain)
    lora_up = [
        v for v in cached.get_layer("block3").weights if "lora_kernel_b" in v.path
    ]
    assert lora_up and all(np.abs(v.numpy()).max() > 0 for v in lora_up)


def test_shuffle_is_seeded_and_reshuffles(data):
    x, y = data
    backbone = _backbone()
    first, h_first = _train(backbone, x, y, True, seed=3, shuffle=True)
    again, h_again = _train(backbone, x, y, True, seed=3, shuffle=True)
    _assert_same_training(first, again, h_first, h_again)
    ordered, _ = _train(backbone, x, y, True, seed=3)
    assert not np.allclose(first.get_weights()[-1], ordered.get_weights()[-1])


def test_steps_per_epoch_uses_keras_batching_and_order(data):
    x, y = data
    backbone = _backbone()
    kwargs = {"steps_per_epoch": 2, "validation_split": 0.25, "shuffle": True}
    cached, h_cached = _train(backbone, x, y, True, **kwargs)
    plain, h_plain = _train(backbone, x, y, False, **kwargs)
    _assert_same_training(cached, plain, h_cached, h_plain)


def test_validation_data_and_sample_weight(data, rng):
    x, y = data
    val = (x[:10] + 0.1, y[:10])
    weights = rng.random(len(y)).astype("float32")
    backbone = _backbone()
    kwargs = {"validation_data": val, "sample_weight": weights, "shuffle": False}
    cached, h_cached = _train(backbone, x, y, True, **kwargs)
    plain, h_plain = _train(backbone, x, y, False, **kwargs)
    _assert_same_training(cached, plain, h_cached, h_plain)
    assert len(h_cached.history["val_loss"]) == 3


def test_prefix_runs_once_per_sample(data):
    x, y = data
    backbone = _backbone(counter=True)
    val = (x[:8], y[:8])
    cached, _ = _train(backbone, x, y, True, epochs=4, validation_data=val)
    plain, _ = _train(backbone, x, y, False, epochs=4, validation_data=val)
    count = float(cached.get_layer("counter").count.numpy())
    assert count == len(y) + 8  # once over training and validation inputs
    assert float(plain.get_layer("counter").count.numpy()) == 4 * (len(y) + 8)


def test_dag_cut_with_two_tensors(data):
    x, y = data
    backbone = _branched()
    attach_kwargs = {"num_classes": 3, "adapters": ["relu_a", "relu_b"], "groups": 2}
    cached, h_cached = _train(backbone, x, y, True, attach_kwargs=attach_kwargs)
    plain, h_plain = _train(backbone, x, y, False, attach_kwargs=attach_kwargs)
    cut = plan_prefix(cached).cut
    assert len(cut) == 2
    _assert_same_training(cached, plain, h_cached, h_plain)


def test_callbacks_see_the_full_model(data, tmp_path):
    x, y = data
    backbone = _backbone()
    path = tmp_path / "best.keras"
    results = []
    for cache in (True, False):
        stop = keras.callbacks.EarlyStopping(
            "val_loss", patience=1, restore_best_weights=True, min_delta=1.0
        )
        checkpoint = keras.callbacks.ModelCheckpoint(path)
        model, history = _train(
            backbone,
            x,
            y,
            cache,
            epochs=6,
            validation_split=0.25,
            callbacks=[stop, checkpoint],
        )
        reloaded = keras.saving.load_model(path)
        assert isinstance(reloaded, PrefixCacheModel)
        results.append(
            (model, history, stop.stopped_epoch, reloaded.predict(x, verbose=0))
        )
    (cached, h_cached, stop_cached, saved_cached), (plain, h_plain, stop_plain, _) = (
        results
    )
    assert stop_cached == stop_plain == 1
    _assert_same_training(cached, plain, h_cached, h_plain)
    # The checkpoint of the last epoch holds the full model, before the restore.
    assert not np.allclose(saved_cached, cached.predict(x, verbose=0), atol=1e-6)


def test_keras_round_trip(data, tmp_path):
    x, y = data
    model, _ = _train(_backbone(), x, y, True, epochs=1)
    model.max_cache_bytes = 1234
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded) is PrefixCacheModel
    assert loaded.max_cache_bytes == 1234 and loaded.cache_prefix is True
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    as_json = json.dumps(model.get_config(), sort_keys=True)
    assert json.dumps(loaded.get_config(), sort_keys=True) == as_json


def _fallback_cases(x, y):
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    return {
        "dataset": ({}, {"x": dataset, "y": None}, "not arrays"),
        "dropout": ({"dropout": True}, {}, "'drop' (Dropout) is random in training"),
        "off": ({}, {"cache": False}, "cache_prefix=False"),
        "memory": ({}, {"max_cache_bytes": 100}, "over max_cache_bytes=100"),
        "unfreeze": (
            {},
            {"callbacks": [kmt.callbacks.ProgressiveUnfreeze([1])]},
            "ProgressiveUnfreeze callback changes frozen layers",
        ),
    }


@pytest.mark.parametrize("case", ["dataset", "dropout", "off", "memory", "unfreeze"])
def test_fallback_says_why_once_and_trains(case, data, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = data
    backbone_kwargs, fit_kwargs, reason = _fallback_cases(x, y)[case]
    keras.utils.set_random_seed(1)
    model = kmt.attach(_backbone(**backbone_kwargs), num_classes=3, groups=2)
    model.cache_prefix = fit_kwargs.pop("cache", True)
    model.max_cache_bytes = fit_kwargs.pop("max_cache_bytes", model.max_cache_bytes)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    before = [w.numpy().copy() for w in model.trainable_weights]
    inputs = fit_kwargs.pop("x", x)
    targets = fit_kwargs.pop("y", y)
    model.fit(inputs, targets, epochs=2, batch_size=16, verbose=0, **fit_kwargs)
    messages = _messages(caplog)
    assert len(messages) == 1
    assert messages[0].startswith("Prefix cache off, training the whole model")
    assert reason in messages[0]
    after = model.trainable_weights[: len(before)]
    assert any(not np.allclose(b, a.numpy()) for b, a in zip(before, after))


def test_short_prefix_is_not_cached(data, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = data
    _train(_backbone(), x, y, True, attach_kwargs={"num_classes": 3, "freeze": False})
    (message,) = _messages(caplog)
    assert "no frozen layer precedes the first trainable layer" in message


def test_prefix_made_trainable_during_fit_is_an_error(data):
    x, y = data

    class Unfreeze(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                self.model.get_layer("block1").trainable = True

    with pytest.raises(RuntimeError, match="cached frozen prefix became trainable"):
        _train(_backbone(), x, y, True, callbacks=[Unfreeze()])


def test_quantize_and_prune_rebuilds_train(data, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = data
    model = kmt.attach(_backbone(), num_classes=3, groups=2)
    for rebuilt in (
        kmt.optimize.quantize_model(model),
        kmt.optimize.prune_low_magnitude(model, target_sparsity=0.5),
    ):
        rebuilt.compile("adam", "sparse_categorical_crossentropy")
        history = rebuilt.fit(x, y, epochs=1, batch_size=16, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    quantized, pruned = _messages(caplog)
    assert "'input_quantizer' (ActivationQuantizer) is a QAT" in quantized
    assert pruned.startswith("Prefix cache off, training the whole model")


def test_mirrored_strategy_cached(data, mirrored):
    x, y = data
    results = []
    for cache in (True, False):
        keras.utils.set_random_seed(1)
        with mirrored.scope():
            model = kmt.attach(_backbone(), num_classes=3, groups=2)
            model.cache_prefix = cache
            model.compile(
                keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy"
            )
        history = model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
        results.append((model, history))
    (cached, h_cached), (plain, h_plain) = results
    _assert_same_training(cached, plain, h_cached, h_plain)
