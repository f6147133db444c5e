import keras
import numpy as np
import pytest

import keras_microtune as kmt


def _model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="low", trainable=False)(inputs)
    x = keras.layers.BatchNormalization(name="bn", trainable=False)(x)
    x = keras.layers.Dense(8, activation="relu", name="high", trainable=False)(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def _data(rng, n=32):
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, (x[:, :3] * 2.0 - x[:, 3:]).astype("float32")


class Snapshots(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = [self._take()]

    def _take(self):
        return {
            name: self.model.get_layer(name).get_weights()[0].copy()
            for name in ("low", "high", "head")
        }

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self._take())


def _changed(snapshots, name, epoch):
    """Did layer `name` change during epoch `epoch`?"""
    return not np.array_equal(snapshots[epoch][name], snapshots[epoch + 1][name])


def _fit(model, rng, callbacks, epochs=4, **kwargs):
    x, y = _data(rng)
    snapshots = Snapshots()
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        callbacks=[*callbacks, snapshots],
        verbose=0,
        **kwargs,
    )
    return history, snapshots.weights


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_unfrozen_layers_train_after_their_epoch_only(rng, steps_per_execution):
    model = _model()
    model.compile(
        keras.optimizers.Adam(1e-2), "mse", steps_per_execution=steps_per_execution
    )
    unfreeze = kmt.callbacks.ProgressiveUnfreeze([1, 2])
    history, weights = _fit(model, rng, [unfreeze])
    assert history.history["unfrozen_blocks"] == [0, 1, 2, 2]
    assert [_changed(weights, "head", e) for e in range(4)] == [True] * 4
    assert [_changed(weights, "high", e) for e in range(4)] == [False, True, True, True]
    assert [_changed(weights, "low", e) for e in range(4)] == [False, False, True, True]
    # BatchNorm stays frozen, so in inference mode.
    bn = model.get_layer("bn")
    assert not bn.trainable
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(8))


def test_train_batchnorm_and_named_blocks(rng):
    model = _model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    unfreeze = kmt.callbacks.ProgressiveUnfreeze(
        [1], blocks=[["low", "bn"]], train_batchnorm=True
    )
    history, weights = _fit(model, rng, [unfreeze], epochs=2)
    assert history.history["unfrozen_blocks"] == [0, 1]
    assert [_changed(weights, "low", e) for e in range(2)] == [False, True]
    assert [_changed(weights, "high", e) for e in range(2)] == [False, False]
    assert model.get_layer("bn").trainable
    assert not np.allclose(model.get_layer("bn").moving_mean.numpy(), 0.0)


def test_learning_rate_multiplier_scales_updates(rng):
    deltas = {}
    for multiplier in (1.0, 0.1):
        keras.utils.set_random_seed(1)
        model = _model()
        model.compile(keras.optimizers.SGD(0.01), "mse")
        unfreeze = kmt.callbacks.ProgressiveUnfreeze(
            [0], learning_rate_multiplier=multiplier
        )
        x, y = _data(np.random.default_rng(0), n=8)
        before = model.get_layer("high").get_weights()[0]
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[unfreeze], verbose=0)
        deltas[multiplier] = model.get_layer("high").get_weights()[0] - before
    np.testing.assert_allclose(deltas[0.1], 0.1 * deltas[1.0], rtol=1e-4, atol=1e-7)


def test_mirrored_strategy(rng, mirrored):
    strategy = mirrored
    with strategy.scope():
        model = _model()
        model.compile(keras.optimizers.Adam(1e-2), "mse")
    unfreeze = kmt.callbacks.ProgressiveUnfreeze([1], learning_rate_multiplier=0.5)
    history, weights = _fit(model, rng, [unfreeze], epochs=2)
    assert history.history["unfrozen_blocks"] == [0, 1]
    assert [_changed(weights, "high", e) for e in range(2)] == [False, True]


@pytest.mark.parametrize("backup_first", [True, False])
def test_backup_and_restore_resume(rng, tmp_path, backup_first, interrupt_at):
    backup = str(tmp_path / "backup")

    def callbacks(*extra):
        unfreeze = kmt.callbacks.ProgressiveUnfreeze([1, 3])
        restore = keras.callbacks.BackupAndRestore(backup)
        pair = [restore, unfreeze] if backup_first else [unfreeze, restore]
        return [*pair, *extra]

    model = _model()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(model, rng, callbacks(interrupt_at(2)))
    saved_high = model.get_layer("high").get_weights()[0]
    resumed = _model()
    resumed.compile(keras.optimizers.Adam(1e-2), "mse")
    history, weights = _fit(resumed, rng, callbacks())
    assert history.history["unfrozen_blocks"] == [1, 2]
    np.testing.assert_array_equal(weights[0]["high"], saved_high)
    assert int(resumed.optimizer.iterations) == 16


def test_unfreezes_a_default_attached_model_with_lora(rng):
    """`kmt.attach`'s default placement trains LoRA factors inside the block
    from the start; after the block unfreezes they still train (the rebuilt
    optimizer lost them before: "Unknown variable: .../lora_kernel_a")."""
    backbone = keras.Sequential(
        [
            keras.Input((16, 3)),
            kmt.layers.FeatureStage([8, 8]),
            kmt.layers.EmbeddingStage(),
            kmt.layers.OutputStage(4),
        ]
    )
    model = kmt.attach(backbone, num_classes=4)
    model.compile("adam", "sparse_categorical_crossentropy")
    lora = [v for v in model.trainable_variables if "lora_kernel_a" in v.path]
    assert lora
    x = rng.normal(size=(32, 16, 3)).astype("float32")
    y = rng.integers(0, 4, size=32)
    before = [keras.ops.convert_to_numpy(v) for v in lora]
    model.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[kmt.callbacks.ProgressiveUnfreeze([1])],
    )
    assert all(v.trainable for v in lora)
    after = [keras.ops.convert_to_numpy(v) for v in lora]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def test_invalid_arguments():
    with pytest.raises(
        ValueError, match="invalid value for `unfreeze_epochs`.*Received"
    ):
        kmt.callbacks.ProgressiveUnfreeze([2, 1])
    with pytest.raises(
        ValueError, match="invalid value for `unfreeze_epochs`.*Received"
    ):
        kmt.callbacks.ProgressiveUnfreeze([])
    with pytest.raises(ValueError, match="invalid value for `blocks`.*Received"):
        kmt.callbacks.ProgressiveUnfreeze([1], blocks=["a", "b"])
    with pytest.raises(ValueError, match="`learning_rate_multiplier`.*Received"):
        kmt.callbacks.ProgressiveUnfreeze([1], learning_rate_multiplier=0)


def test_missing_prerequisites(rng):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile("adam", "mse")
    x, y = _data(rng)
    with pytest.raises(ValueError, match="frozen layers with weights"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[kmt.callbacks.ProgressiveUnfreeze([1])],
        )
    model = _model()
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match="no layer named"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[kmt.callbacks.ProgressiveUnfreeze([1], blocks=["nope"])],
        )
