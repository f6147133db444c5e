"""Resuming an attached model: its LoRA adapters come back exactly after a load.

Keras saves LoRA merged into the kernel and loads it back with both factors
zero, which would leave their gradients zero for good; PrefixCacheModel saves
the kernel and factors too and puts them back.
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
def test_reloaded_model_gets_its_exact_lora_factors_back(how, tmp_path, rng, caplog):
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
        loaded._restart_lora()  # What fit does first; load_weights did it already.
    for (a, b), (a2, b2) in zip(_factors(model), _factors(loaded)):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(b2, b)
    for name in ("conv1", "conv2"):
        np.testing.assert_array_equal(
            loaded.get_layer(name)._kernel.numpy(),
            model.get_layer(name)._kernel.numpy(),
        )
    messages = [r.getMessage() for r in caplog.records]
    assert sum("exactly" in m and "2 layers" in m for m in messages) == 1
    assert not any("re-initialised" in m for m in messages)
    _assert_adapters_train(loaded, x, y)


def test_file_without_the_lora_state_restarts_the_factors(tmp_path, rng, caplog):
    """A plain Keras model's weights file has no LoRA entry: A is drawn again."""
    x, y = _data(rng)
    model = _attached()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    expected = model.predict(x, verbose=0)
    plain = keras.Model(model.inputs, model.outputs)  # The same layers.
    plain.save_weights(tmp_path / "plain.weights.h5")
    loaded = _attached()
    with caplog.at_level("INFO", logger="keras_microtune"):
        loaded.load_weights(tmp_path / "plain.weights.h5")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    restarts = [r for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(restarts) == 1 and "2 LoRA layers" in restarts[0].getMessage()
    _assert_adapters_train(loaded, x, y)


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resume_equals_the_uninterrupted_fit(tmp_path, rng):
    x, y = _data(rng)
    backup = str(tmp_path / "backup")
    fit = dict(x=x, y=y, batch_size=8, epochs=3, verbose=0, shuffle=False)
    uninterrupted = _attached()
    start = uninterrupted.get_weights()
    uninterrupted.fit(**fit)
    model = _attached()
    model.set_weights(start)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            **fit,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup),
                _StopAfterFirstEpoch(),
            ],
        )
    resumed = _attached()  # Other random LoRA factors, until restored.
    seen = []

    class _Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    resumed.fit(**fit, callbacks=[keras.callbacks.BackupAndRestore(backup), _Record()])
    assert seen == [1, 2]
    for got, want in zip(resumed.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


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
    loaded.load_weights(tmp_path / "m.keras")  # Puts the saved factors back.
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
