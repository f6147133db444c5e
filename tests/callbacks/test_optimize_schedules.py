import keras
import numpy as np
import pytest

import keras_microtune as kmt


def _float_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4),
        ]
    )


def _data(n=32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, rng.normal(size=(n, 4)).astype("float32")


def _ranges(model):
    return np.array(
        [v.numpy() for v in model.variables if v.name in ("range_min", "range_max")]
    )


class RecordRanges(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.ranges.append(_ranges(self.model))

    def on_train_begin(self, logs=None):
        self.ranges = []


def test_quantization_schedule_drives_fake_quant_and_ranges():
    x, y = _data()
    float_model = _float_model()
    float_loss = float(keras.ops.mean((float_model.predict(x, verbose=0) - y) ** 2))
    qat = kmt.optimize.quantize_model(float_model)
    # Learning rate 0: the loss changes only through the quantization flags.
    qat.compile(keras.optimizers.SGD(0.0), "mse")
    schedule = kmt.callbacks.QuantizationSchedule(start_epoch=1, freeze_ranges_epoch=2)
    record = RecordRanges()
    history = qat.fit(
        x, y, batch_size=32, epochs=3, callbacks=[schedule, record], verbose=0
    )
    assert history.history["quantization_enabled"] == [0.0, 1.0, 1.0]
    assert history.history["ranges_frozen"] == [0.0, 0.0, 1.0]
    assert history.history["batch_norm_frozen"] == [0.0, 0.0, 0.0]
    # Epoch 0 trains in float, later epochs with int8 fake quantization.
    losses = history.history["loss"]
    assert losses[0] == pytest.approx(float_loss, rel=1e-5)
    assert abs(losses[1] - float_loss) > 1e-6 * float_loss
    # Ranges move with the moving average until frozen.
    assert not np.array_equal(record.ranges[0], record.ranges[1])
    np.testing.assert_array_equal(record.ranges[1], record.ranges[2])


def test_quantization_schedule_errors():
    with pytest.raises(
        ValueError, match="invalid value for `freeze_ranges_epoch`.*Received"
    ):
        kmt.callbacks.QuantizationSchedule(start_epoch=3, freeze_ranges_epoch=1)
    with pytest.raises(ValueError, match="invalid value for `start_epoch`"):
        kmt.callbacks.QuantizationSchedule(start_epoch=-1)
    model = _float_model()
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match=r"kmt.optimize.quantize_model\(model\)"):
        model.fit(*_data(), verbose=0, callbacks=[kmt.callbacks.QuantizationSchedule()])


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_pruning_schedule_logs_rising_sparsity(steps_per_execution):
    x, y = _data()
    pruned = kmt.optimize.prune_low_magnitude(
        _float_model(), target_sparsity=0.75, begin_step=0, end_step=8, frequency=2
    )
    pruned.compile("adam", "mse", steps_per_execution=steps_per_execution)
    history = pruned.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        callbacks=[kmt.callbacks.PruningSchedule()],
        verbose=0,
    )
    sparsity = history.history["sparsity"]
    assert history.history["pruning_step"] == [4.0, 8.0, 12.0]
    # Masks update at steps 0, 2, 4, 6 (polynomial ramp) and 8 (the target).
    assert 0.0 < sparsity[0] < sparsity[1] < sparsity[2]
    assert sparsity[2] == pytest.approx(0.75, abs=0.01)
    stripped = kmt.optimize.strip(pruned)
    kernels = [w for w in stripped.weights if "kernel" in w.name]
    zeros = sum(int(np.sum(k.numpy() == 0)) for k in kernels)
    assert zeros / sum(k.numpy().size for k in kernels) == pytest.approx(0.75, abs=0.01)


def test_pruning_schedule_mirrored_strategy(mirrored):
    x, y = _data()
    with mirrored.scope():
        pruned = kmt.optimize.prune_low_magnitude(
            _float_model(), target_sparsity=0.5, begin_step=0, end_step=4, frequency=1
        )
        pruned.compile("adam", "mse")
    history = pruned.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        callbacks=[kmt.callbacks.PruningSchedule()],
        verbose=0,
    )
    assert history.history["sparsity"][-1] == pytest.approx(0.5, abs=0.01)


def test_pruning_schedule_errors():
    with pytest.raises(
        ValueError, match="invalid value for `update_masks_on_epoch_end`"
    ):
        kmt.callbacks.PruningSchedule(update_masks_on_epoch_end="yes")
    model = _float_model()
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match=r"kmt.optimize.prune_low_magnitude\(model"):
        model.fit(*_data(), verbose=0, callbacks=[kmt.callbacks.PruningSchedule()])
