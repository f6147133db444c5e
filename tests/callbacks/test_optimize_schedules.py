import re

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


FLAGS = {
    "quantization_enabled": "quant_enabled",
    "ranges_frozen": "range_frozen",
    "batch_norm_frozen": "bn_frozen",
}


def _bn_model():
    """Dense -> BatchNorm -> ReLU -> Dense: quantize_model folds the BatchNorm."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def _flag_values(model, strategy=None):
    """{log name: set of the values of that flag over all variables (and replicas)}."""
    values = {}
    for log_name, variable_name in FLAGS.items():
        found = set()
        for v in model.variables:
            if v.name == variable_name:
                copies = (
                    strategy.experimental_local_results(v.value) if strategy else [v]
                )
                found.update(float(keras.ops.convert_to_numpy(c)) for c in copies)
        values[log_name] = found
    return values


def _moving_means(model):
    means = [v.numpy().ravel() for v in model.variables if v.name == "moving_mean"]
    return np.concatenate(means) if means else np.zeros(0)


def _replica_ranges(model, strategy):
    """The activation ranges of every replica, replica by replica."""
    return np.array(
        [
            [
                keras.ops.convert_to_numpy(c)
                for c in strategy.experimental_local_results(v.value)
            ]
            for v in model.variables
            if v.name in ("range_min", "range_max")
        ]
    ).T


class RecordState(keras.callbacks.Callback):
    """Flag variables (as the model holds them), ranges and BatchNorm statistics."""

    def __init__(self, strategy=None):
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, logs=None):
        self.flags, self.ranges, self.moving_means = [], [], []

    def on_epoch_end(self, epoch, logs=None):
        self.flags.append(_flag_values(self.model, self.strategy))
        if self.strategy is None:
            self.ranges.append(_ranges(self.model))
        else:
            self.ranges.append(_replica_ranges(self.model, self.strategy))
        self.moving_means.append(_moving_means(self.model))


def _assert_flags_match_logs(history, record):
    """The flag variables hold, in every epoch, the values the logs report."""
    for epoch, flags in enumerate(record.flags):
        for log_name, values in flags.items():
            expected = history.history[log_name][epoch]
            # No BatchNorm, no bn_frozen variable: nothing to compare.
            assert values in ({expected}, set()), (epoch, log_name, values)
    assert record.flags[-1]["quantization_enabled"]  # The model has quantizers.


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


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_quantization_schedule_freezes_batch_norm(steps_per_execution):
    x, y = _data()
    qat = kmt.optimize.quantize_model(_bn_model())
    qat.compile(
        keras.optimizers.SGD(0.01), "mse", steps_per_execution=steps_per_execution
    )
    schedule = kmt.callbacks.QuantizationSchedule(
        start_epoch=1, freeze_ranges_epoch=2, freeze_batch_norm_epoch=3
    )
    record = RecordState()
    history = qat.fit(
        x, y, batch_size=8, epochs=4, callbacks=[schedule, record], verbose=0
    )
    assert history.history["quantization_enabled"] == [0.0, 1.0, 1.0, 1.0]
    assert history.history["ranges_frozen"] == [0.0, 0.0, 1.0, 1.0]
    assert history.history["batch_norm_frozen"] == [0.0, 0.0, 0.0, 1.0]
    _assert_flags_match_logs(history, record)
    # Ranges move until epoch 2, the folded BatchNorm's statistics until epoch 3.
    ranges, means = record.ranges, record.moving_means
    assert not np.array_equal(ranges[0], ranges[1])
    np.testing.assert_array_equal(ranges[1], ranges[2])
    np.testing.assert_array_equal(ranges[2], ranges[3])
    assert not np.array_equal(means[1], means[2])
    np.testing.assert_array_equal(means[2], means[3])


def test_quantization_schedule_mirrored_strategy(mirrored):
    x, y = _data()
    float_model = _float_model()
    float_loss = float(keras.ops.mean((float_model.predict(x, verbose=0) - y) ** 2))
    with mirrored.scope():
        qat = kmt.optimize.quantize_model(float_model)
        qat.compile(keras.optimizers.SGD(0.0), "mse")
    schedule = kmt.callbacks.QuantizationSchedule(start_epoch=1, freeze_ranges_epoch=2)
    record = RecordState(mirrored)
    history = qat.fit(
        x, y, batch_size=8, epochs=3, callbacks=[schedule, record], verbose=0
    )
    assert history.history["quantization_enabled"] == [0.0, 1.0, 1.0]
    assert history.history["ranges_frozen"] == [0.0, 0.0, 1.0]
    # Both replicas hold every flag the logs report.
    _assert_flags_match_logs(history, record)
    losses = history.history["loss"]
    assert losses[0] == pytest.approx(float_loss, rel=1e-5)
    assert abs(losses[1] - float_loss) > 1e-6 * float_loss
    assert not np.array_equal(record.ranges[0], record.ranges[1])
    np.testing.assert_array_equal(record.ranges[1], record.ranges[2])


@pytest.mark.parametrize("backup_first", [True, False])
def test_quantization_schedule_backup_and_restore_resume(
    tmp_path, backup_first, interrupt_at
):
    x, y = _data()
    backup = str(tmp_path / "backup")

    def fit(*extra):
        qat = kmt.optimize.quantize_model(_bn_model())
        qat.compile(keras.optimizers.SGD(0.01), "mse")
        schedule = kmt.callbacks.QuantizationSchedule(
            start_epoch=1, freeze_ranges_epoch=2, freeze_batch_norm_epoch=3
        )
        restore = keras.callbacks.BackupAndRestore(backup)
        pair = [restore, schedule] if backup_first else [schedule, restore]
        record = RecordState()
        history = qat.fit(
            x,
            y,
            batch_size=8,
            epochs=4,
            callbacks=[*pair, *extra, record],
            verbose=0,
            shuffle=False,
        )
        return qat, history, record

    reference = fit()[1].history  # Uninterrupted; BackupAndRestore cleans up.
    interrupted = RecordState()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(interrupt_at(2), interrupted)
    qat, history, record = fit()
    for name in FLAGS:
        assert history.history[name] == reference[name][2:]
    assert history.history["quantization_enabled"] == [1.0, 1.0]
    assert history.history["ranges_frozen"] == [1.0, 1.0]
    assert history.history["batch_norm_frozen"] == [0.0, 1.0]
    _assert_flags_match_logs(history, record)
    assert _flag_values(qat) == {name: {1.0} for name in FLAGS}
    # The ranges learned before the interruption were restored and stay frozen.
    np.testing.assert_array_equal(record.ranges[-1], interrupted.ranges[-1])
    # The BatchNorm statistics were restored and moved once more in epoch 2.
    assert not np.array_equal(record.moving_means[0], interrupted.moving_means[-1])
    np.testing.assert_array_equal(record.moving_means[0], record.moving_means[1])
    np.testing.assert_allclose(
        history.history["loss"], reference["loss"][2:], rtol=1e-5
    )


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


@pytest.mark.parametrize("update_masks_on_epoch_end", [False, True])
def test_pruning_schedule_backup_and_restore_resume(
    tmp_path, update_masks_on_epoch_end, interrupt_at
):
    x, y = _data()
    backup = str(tmp_path / "backup")

    def fit(*extra):
        # 4 steps an epoch, masks every 8 steps (and every epoch end if asked).
        pruned = kmt.optimize.prune_low_magnitude(
            _float_model(), target_sparsity=0.75, end_step=16, frequency=8
        )
        pruned.compile("adam", "mse")
        schedule = kmt.callbacks.PruningSchedule(update_masks_on_epoch_end)
        restore = keras.callbacks.BackupAndRestore(backup)
        history = pruned.fit(
            x,
            y,
            batch_size=8,
            epochs=5,
            callbacks=[restore, schedule, *extra],
            verbose=0,
            shuffle=False,
        )
        return pruned, history

    reference = fit()[1].history  # Uninterrupted; BackupAndRestore cleans up.
    assert reference["pruning_step"] == [4.0, 8.0, 12.0, 16.0, 20.0]
    sparsity = reference["sparsity"]
    if update_masks_on_epoch_end:  # Masks at steps 4, 8, 12, 16, 20.
        assert 0.0 < sparsity[0] < sparsity[1] < sparsity[2] < sparsity[3]
    else:  # Masks at steps 0, 8 and 16.
        assert sparsity[0] == sparsity[1] == 0.0 < sparsity[2] == sparsity[3]
    assert sparsity[4] == pytest.approx(0.75, abs=0.01)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(interrupt_at(3))
    pruned, history = fit()
    # The schedule goes on from step 12, not from 0.
    assert history.history["pruning_step"] == [16.0, 20.0]
    np.testing.assert_allclose(history.history["sparsity"], sparsity[3:])
    # Same masks in the resumed epochs as in the uninterrupted run.
    np.testing.assert_allclose(
        history.history["loss"], reference["loss"][3:], rtol=1e-5
    )
    steps = [v.numpy() for v in pruned.variables if v.name == "pruning_step"]
    assert steps == [20.0, 20.0]
    zeros = kmt.optimize.pruning_summary(kmt.optimize.strip(pruned))
    assert list(zeros.values()) == pytest.approx([0.75, 0.75], abs=0.01)


def test_pruning_schedule_errors():
    with pytest.raises(
        ValueError, match="invalid value for `update_masks_on_epoch_end`"
    ):
        kmt.callbacks.PruningSchedule(update_masks_on_epoch_end="yes")
    model = _float_model()
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match=r"kmt.optimize.prune_low_magnitude\(model"):
        model.fit(*_data(), verbose=0, callbacks=[kmt.callbacks.PruningSchedule()])


def test_pruning_schedule_reaches_target_with_default_frequency():
    """Issue 18: end_step=93 with the default frequency=100, 3 epochs of 62 steps,
    logged 0.0 sparsity three times on main; the target is reached at end_step."""
    x, y = _data(62)
    pruned = kmt.optimize.prune_low_magnitude(
        _float_model(), target_sparsity=0.5, begin_step=0, end_step=93
    )
    pruned.compile("adam", "mse")
    history = pruned.fit(
        x,
        y,
        batch_size=1,
        epochs=3,
        callbacks=[kmt.callbacks.PruningSchedule()],
        verbose=0,
    )
    assert history.history["sparsity"][0] == 0.0  # Only step 0 so far.
    assert history.history["sparsity"][1:] == pytest.approx([0.5, 0.5], abs=0.01)
    zeros = kmt.optimize.pruning_summary(kmt.optimize.strip(pruned))
    assert list(zeros.values()) == pytest.approx([0.5, 0.5], abs=0.01)


def _prune_fit(end_step, frequency, **schedule):
    x, y = _data()
    pruned = kmt.optimize.prune_low_magnitude(
        _float_model(), target_sparsity=0.5, end_step=end_step, frequency=frequency
    )
    pruned.compile("adam", "mse")
    callback = kmt.callbacks.PruningSchedule(**schedule)
    history = pruned.fit(
        x, y, batch_size=8, epochs=3, callbacks=[callback], verbose=0
    )  # 12 steps: 0 ... 11.
    return history.history["sparsity"][-1]


def test_pruning_schedule_warns_when_masks_end_below_the_schedule():
    # Masks updated at steps 0 and 8; the schedule promises more by step 11.
    with pytest.warns(kmt.KerasMicrotuneWarning) as record:
        sparsity = _prune_fit(end_step=20, frequency=8)
    assert sparsity == pytest.approx(0.5 * (1 - (12 / 20) ** 3), abs=0.01)
    ours = [w for w in record if issubclass(w.category, kmt.KerasMicrotuneWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    found = re.search(
        r"at ([\d.]+)% sparsity, ([\d.]+) points below the ([\d.]+)%", message
    )
    ended, gap, promised = (float(v) for v in found.groups())
    assert ended == pytest.approx(sparsity * 100, abs=0.05)
    assert promised == pytest.approx(50 * (1 - (9 / 20) ** 3), abs=1)  # At step 11.
    assert gap == pytest.approx(promised - ended, abs=0.1) and gap > 1
    assert "the last update was at step 8" in message
    assert "end_step=20 is beyond the 12 steps trained" in message
    assert "use end_step <= 11" in message


@pytest.mark.parametrize(
    "end_step, frequency, schedule",
    [
        (11, 8, {}),  # The final update at end_step=11 ran: the target is there.
        (20, 1, {}),  # Short of end_step, but the masks follow the schedule.
        (20, 8, {"update_masks_on_epoch_end": True}),
    ],
)
def test_pruning_schedule_quiet_when_masks_follow_the_schedule(
    end_step, frequency, schedule
):
    # filterwarnings=error: a KerasMicrotuneWarning here fails the test.
    sparsity = _prune_fit(end_step, frequency, **schedule)
    if end_step == 11:
        assert sparsity == pytest.approx(0.5, abs=0.01)
