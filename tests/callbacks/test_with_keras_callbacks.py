"""keras_microtune callbacks together, and next to Keras' own, in one `fit`.

Our callbacks write their values into the epoch `logs` in `on_epoch_end`;
Keras calls callbacks in list order, so loggers and monitors (CSVLogger,
TensorBoard, EarlyStopping, ModelCheckpoint) go after them in the list.
"""

import csv
import glob
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_microtune as kmt

SPARSITY = 0.5
END_STEP = 8  # 4 steps an epoch: masks every 2 steps until step 8.
OUR_KEYS = (
    "learning_rate",
    "quantization_enabled",
    "ranges_frozen",
    "batch_norm_frozen",
    "sparsity",
    "pruning_step",
)


def _data(n=32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, rng.normal(size=(n, 4)).astype("float32")


def _model():
    """Quantization-aware, then pruned: both schedules drive one model."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    qat = kmt.optimize.quantize_model(model)
    pruned = kmt.optimize.prune_low_magnitude(
        qat, target_sparsity=SPARSITY, end_step=END_STEP, frequency=2
    )
    pruned.compile(keras.optimizers.Adam(1e-3), "mse")
    return pruned


def _ours():
    return [
        kmt.callbacks.WarmupCosine(0.01, warmup_steps=4, decay_steps=8),
        kmt.callbacks.QuantizationSchedule(start_epoch=1, freeze_ranges_epoch=2),
        kmt.callbacks.PruningSchedule(),
    ]


def _expected(epochs):
    """What our callbacks log after each epoch of 4 steps."""
    schedule = _ours()[0]
    expected = {name: [] for name in OUR_KEYS}
    for epoch in range(epochs):
        last = 4 * epoch + 3
        # The masks in use were computed at the last even step <= END_STEP.
        mask_step = min(last - last % 2, END_STEP)
        p = mask_step / END_STEP
        s = SPARSITY * (1 - (1 - p) ** 3)
        zeros = round(s * 8 * 16) + round(s * 16 * 4)
        expected["learning_rate"].append(schedule.value(last))
        expected["quantization_enabled"].append(float(epoch >= 1))
        expected["ranges_frozen"].append(float(epoch >= 2))
        expected["batch_norm_frozen"].append(0.0)
        expected["sparsity"].append(zeros / (8 * 16 + 16 * 4))
        expected["pruning_step"].append(4.0 * (epoch + 1))
    return expected


def _read_csv(path):
    """{column: values}; CSVLogger writes "NA" in its empty `val_` columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        key: [math.nan if row[key] == "NA" else float(row[key]) for row in rows]
        for key in rows[0]
    }


def _read_scalars(log_dir):
    """{tag: {step: value}} of the epoch scalars in the TensorBoard event files."""
    paths = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert paths, f"no event files in {log_dir}"
    scalars = {}
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.startswith("epoch_"):
                    number = float(tf.make_ndarray(value.tensor))
                    scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


def _flag(model, name):
    return sorted({float(v.numpy()) for v in model.variables if v.name == name})


def test_schedules_with_csv_tensorboard_checkpoint_and_early_stopping(tmp_path):
    x, y = _data()
    model = _model()
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:8], every=3)
    early = keras.callbacks.EarlyStopping(monitor="loss", patience=3)
    callbacks = [
        *_ours(),
        budget,
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
        early,
        keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch_{epoch}.keras")),
    ]
    history = model.fit(
        x, y, batch_size=8, epochs=3, callbacks=callbacks, verbose=0
    ).history
    expected = _expected(3)
    for name in OUR_KEYS:
        assert history[name] == pytest.approx(expected[name], rel=1e-6), name
    assert 0.0 < history["sparsity"][0] < history["sparsity"][1] < SPARSITY
    assert early.stopped_epoch == 0

    # The CSV file has a column for every value our callbacks log.
    logged = _read_csv(tmp_path / "log.csv")
    assert logged["epoch"] == [0.0, 1.0, 2.0]
    for name in (*OUR_KEYS, "loss", "int8_size_bytes", "arena_bytes"):
        np.testing.assert_allclose(logged[name], history[name], rtol=1e-6)
    assert math.isnan(logged["int8_size_bytes"][0])  # Measured at epoch 2 only.
    assert 8 * 16 < logged["int8_size_bytes"][2] < 32 * 1024
    assert logged["fits_target"][2] == 1.0
    # The converted (stripped, int8) model computes what the trained one does.
    assert budget.result.parity["cosine"] > 0.999

    # TensorBoard wrote the same values as epoch scalars.
    scalars = _read_scalars(tmp_path / "tb" / "train")
    for name in (*OUR_KEYS, "loss"):
        by_epoch = scalars[f"epoch_{name}"]
        assert sorted(by_epoch) == [0, 1, 2], name
        values = [by_epoch[epoch] for epoch in range(3)]
        np.testing.assert_allclose(values, history[name], rtol=1e-6, err_msg=name)

    # Checkpoints load back (kmt layers are serializable) with their state.
    first = keras.saving.load_model(tmp_path / "epoch_1.keras")
    assert _flag(first, "quant_enabled") == [0.0]
    assert _flag(first, "pruning_step") == [4.0]
    last = keras.saving.load_model(tmp_path / "epoch_3.keras")
    assert _flag(last, "quant_enabled") == [1.0]
    assert _flag(last, "range_frozen") == [1.0]
    assert _flag(last, "pruning_step") == [12.0]
    np.testing.assert_allclose(
        last.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    stripped = kmt.optimize.strip(last)
    assert list(kmt.optimize.pruning_summary(stripped).values()) == pytest.approx(
        [SPARSITY, SPARSITY], abs=0.01
    )


def test_early_stopping_on_a_value_our_callback_logs():
    x, _ = _data()
    y = np.concatenate([x, -x], axis=1)
    keras.utils.set_random_seed(0)
    model = kmt.optimize.prune_low_magnitude(
        keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)]),
        target_sparsity=SPARSITY,
        end_step=4,
        frequency=1,
    )
    model.compile("adam", "mse")
    # Stop once the sparsity stops rising: the target was reached at step 4.
    early = keras.callbacks.EarlyStopping(monitor="sparsity", mode="max", patience=0)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=20,
        callbacks=[kmt.callbacks.PruningSchedule(), early],
        verbose=0,
    ).history
    assert history["pruning_step"] == [4.0, 8.0, 12.0]
    # Masks at step 3 (epoch 0), then at step 4: the target.
    assert history["sparsity"] == [63 / 128, SPARSITY, SPARSITY]
    assert early.stopped_epoch == 2


def test_backup_and_restore_resume_continues_every_logged_value(tmp_path, interrupt_at):
    x, y = _data()
    backup = str(tmp_path / "backup")
    log = str(tmp_path / "log.csv")

    def fit(*extra):
        model = _model()
        callbacks = [
            keras.callbacks.BackupAndRestore(backup),
            *_ours(),
            keras.callbacks.CSVLogger(log, append=True),
            *extra,
        ]
        history = model.fit(
            x, y, batch_size=8, epochs=4, callbacks=callbacks, verbose=0
        )
        return model, history.history

    with pytest.raises(RuntimeError, match="interrupted"):
        fit(interrupt_at(2))
    model, history = fit()
    expected = _expected(4)
    for name in OUR_KEYS:
        assert history[name] == pytest.approx(expected[name][2:], rel=1e-6), name
    # One CSV row per epoch over both runs, as an uninterrupted run writes them.
    logged = _read_csv(log)
    assert logged["epoch"] == [0.0, 1.0, 2.0, 3.0]
    for name in OUR_KEYS:
        np.testing.assert_allclose(logged[name], expected[name], rtol=1e-6)
    assert _flag(model, "pruning_step") == [16.0]
    assert _flag(model, "quant_enabled") == [1.0]
    assert _flag(model, "range_frozen") == [1.0]
    assert int(model.optimizer.iterations) == 16
