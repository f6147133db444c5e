"""Resuming an attached model: its LoRA adapters keep training after a load.

Keras saves LoRA merged into the kernel and loads it back with both factors
zero, which would leave their gradients zero for good.
"""

import keras
import numpy as np
import pytest

import keras_microtune as kmt


def _attached():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = kmt.attach(keras.Model(inputs, outputs), num_classes=3)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    return model


def _data(rng):
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    return x, rng.integers(0, 3, size=32)


def _backbone(model):
    """The backbone's effective kernels (Keras' `kernel` adds LoRA's A @ B)."""
    return np.concatenate(
        [np.ravel(model.get_layer(n).kernel) for n in ("conv1", "conv2")]
    )


def _factors(model):
    layers = [model.get_layer("conv1"), model.get_layer("conv2")]
    return [(x.lora_kernel_a.numpy(), x.lora_kernel_b.numpy()) for x in layers]


def _assert_adapters_train(model, x, y):
    """A further fit changes the backbone through non-zero LoRA factors."""
    paths = sorted(v.path for v in model.trainable_weights)
    assert "conv1/lora_kernel_a" in paths and "conv2/lora_kernel_b" in paths
    before = _backbone(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.abs(_backbone(model) - before).max() > 1e-3
    for a, b in _factors(model):
        assert np.abs(a).max() > 0.1 and np.abs(b).max() > 0


@pytest.mark.parametrize("how", ["weights", "keras"])
def test_reloaded_model_keeps_training_its_adapters(how, tmp_path, rng, caplog):
    x, y = _data(rng)
    model = _attached()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    expected = model.predict(x, verbose=0)
    if how == "weights":
        model.save_weights(tmp_path / "m.weights.h5")
        loaded = _attached()
        with caplog.at_level("INFO", logger="keras_microtune"):
            loaded.load_weights(tmp_path / "m.weights.h5")
    else:
        model.save(tmp_path / "m.keras")
        loaded = keras.saving.load_model(tmp_path / "m.keras")
        assert sorted(v.path for v in loaded.trainable_weights) == sorted(
            v.path for v in model.trainable_weights
        )
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    with caplog.at_level("INFO", logger="keras_microtune"):
        _assert_adapters_train(loaded, x, y)
    restarts = [r for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(restarts) == 1 and "2 LoRA layers" in restarts[0].getMessage()


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resume_keeps_training_adapters(tmp_path, rng):
    x, y = _data(rng)
    backup = str(tmp_path / "backup")
    model = _attached()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            verbose=0,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup),
                _StopAfterFirstEpoch(),
            ],
        )
    expected = model.predict(x, verbose=0)
    resumed = _attached()
    seen = []

    class _Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append((epoch, self.model.predict(x, verbose=0)))

    resumed.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup), _Record()],
    )
    assert seen[0][0] == 1
    np.testing.assert_allclose(seen[0][1], expected, atol=1e-6)
    for a, b in _factors(resumed):
        assert np.abs(a).max() > 0.1 and np.abs(b).max() > 0
    assert np.abs(_backbone(resumed) - _backbone(model)).max() > 1e-3


def _litert(tflite, x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(tflite))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_merge_and_convert_match_after_restart(tmp_path, rng):
    x, y = _data(rng)
    model = _attached()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    loaded.load_weights(tmp_path / "m.keras")  # Restarts the zero factors.
    assert all(np.abs(a).max() > 0.1 for a, _ in _factors(loaded))
    expected = model.predict(x, verbose=0)
    for m in (model, loaded):
        merged = kmt.optimize.merge_adapters(m)
        np.testing.assert_allclose(merged.predict(x, verbose=0), expected, atol=1e-6)
        tflite = kmt.convert(m, "float32", verbose=0).tflite
        np.testing.assert_allclose(_litert(tflite, x[:1]), expected[:1], atol=1e-5)


def test_invalid_trainable_paths():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="dense")(inputs)
    with pytest.raises(ValueError, match=r"no variables \['dense/gamma'\]"):
        kmt.training.PrefixCacheModel(inputs, outputs, trainable_paths=["dense/gamma"])
    with pytest.raises(TypeError, match="`trainable_paths`.*Received"):
        kmt.training.PrefixCacheModel(inputs, outputs, trainable_paths="dense/kernel")
    model = kmt.training.PrefixCacheModel(
        inputs, outputs, trainable_paths=["dense/kernel"]
    )
    assert model.get_config()["trainable_paths"] == ["dense/kernel", "dense/bias"]
