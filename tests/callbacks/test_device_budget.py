import math

import keras
import numpy as np
import pytest

import keras_microtune as kmt


def _model(units):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(4),
        ]
    )


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 64)).astype("float32"), rng.integers(0, 4, size=(n,))


def test_stops_a_model_over_the_cortex_m0plus_budget():
    x, y = _data()
    # 64 * 4096 + 4096 * 4 int8 weights: about 280 kB, over the 256 KiB flash.
    model = _model(4096)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:8], on_exceed="stop")
    with pytest.warns(
        kmt.KerasMicrotuneWarning, match="no longer fits 'cortex-m0plus'"
    ):
        history = model.fit(x, y, epochs=3, callbacks=[budget], verbose=0)
    assert len(history.history["loss"]) == 1  # stopped after the first epoch
    assert history.history["fits_target"] == [0.0]
    assert history.history["int8_size_bytes"][0] > 256 * 1024
    assert budget.seconds > 0


def test_logs_size_and_arena_of_a_model_that_fits():
    x, y = _data()
    model = _model(16)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:8], every=2)
    history = model.fit(x, y, epochs=2, callbacks=[budget], verbose=0)
    assert math.isnan(history.history["int8_size_bytes"][0])  # not measured yet
    size = history.history["int8_size_bytes"][1]
    assert 64 * 16 < size < 32 * 1024
    assert 0 < history.history["arena_bytes"][1] < 32 * 1024
    assert history.history["fits_target"] == [pytest.approx(math.nan, nan_ok=True), 1.0]


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_mirrored_strategy(mirrored):
    x, y = _data()
    with mirrored.scope():
        model = _model(16)
        model.compile(keras.optimizers.Adam(0.05), _loss())
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:8])
    history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[budget], verbose=0)
    sizes = history.history["int8_size_bytes"]
    assert 64 * 16 < sizes[0] == sizes[1] < 32 * 1024
    assert all(0 < arena < 32 * 1024 for arena in history.history["arena_bytes"])
    assert history.history["fits_target"] == [1.0, 1.0]
    # The converted model computes what the trained (mirrored) model computes.
    parity = budget.result.parity
    assert parity["top1_agreement"] == 1.0
    assert parity["cosine"] > 0.999
    assert parity["tflm_within_tolerance"]


def test_pruned_model_is_measured_stripped():
    x, y = _data()
    pruned = kmt.optimize.prune_low_magnitude(
        _model(16), target_sparsity=0.5, end_step=3, frequency=1
    )
    pruned.compile("adam", _loss(), steps_per_execution=2)
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:8])
    history = pruned.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        callbacks=[kmt.callbacks.PruningSchedule(), budget],
        verbose=0,
    )
    assert history.history["sparsity"] == [pytest.approx(0.5)]
    assert 64 * 16 < history.history["int8_size_bytes"][0] < 32 * 1024
    assert history.history["fits_target"] == [1.0]
    assert budget.result.parity["cosine"] > 0.999
    # The training model keeps its wrappers.
    assert kmt.optimize.prune.has_pruning(pruned)


def test_backup_and_restore_resume_measures_at_once(
    tmp_path, monkeypatch, interrupt_at
):
    from keras_microtune.export import converter

    x, y = _data()
    backup = str(tmp_path / "backup")
    measured = []
    convert = converter.convert

    def counting_convert(model, *args, **kwargs):
        measured.append(model.get_weights()[0].copy())
        return convert(model, *args, **kwargs)

    monkeypatch.setattr(converter, "convert", counting_convert)

    def fit(*extra):
        model = _model(16)
        model.compile("adam", _loss())
        budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:8], every=3)
        callbacks = [keras.callbacks.BackupAndRestore(backup), budget, *extra]
        history = model.fit(
            x, y, batch_size=8, epochs=3, callbacks=callbacks, verbose=0
        )
        return model, history

    with pytest.raises(RuntimeError, match="interrupted"):
        fit(interrupt_at(1))
    assert measured == []  # Epoch 0 is not a scheduled measurement.
    model, history = fit()
    # Epoch 1 opens the resumed fit, so it is measured; epoch 2 is scheduled.
    assert len(measured) == 2
    sizes = history.history["int8_size_bytes"]
    assert len(sizes) == 2 and not any(math.isnan(s) for s in sizes)
    assert not any(math.isnan(a) for a in history.history["arena_bytes"])
    assert history.history["fits_target"] == [1.0, 1.0]
    assert not np.array_equal(measured[0], measured[1])
    np.testing.assert_array_equal(measured[1], model.get_weights()[0])


def test_a_fresh_fit_measures_on_schedule_only(monkeypatch):
    from keras_microtune.export import converter

    x, y = _data()
    calls = []
    monkeypatch.setattr(converter, "convert", lambda *a, **k: calls.append(a))
    model = _model(16)
    model.compile("adam", _loss())
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:8], every=5)
    history = model.fit(x, y, epochs=3, callbacks=[budget], verbose=0)
    assert calls == []
    assert all(math.isnan(s) for s in history.history["int8_size_bytes"])


def test_invalid_arguments():
    x, _ = _data()
    with pytest.raises(
        ValueError, match="invalid value for `on_exceed`.*Received: on_exceed='halt'"
    ):
        kmt.callbacks.DeviceBudget("cortex-m0plus", x, on_exceed="halt")
    with pytest.raises(ValueError, match="invalid value for `every`"):
        kmt.callbacks.DeviceBudget("cortex-m0plus", x, every=0)
    with pytest.raises(ValueError, match="representative_data"):
        kmt.callbacks.DeviceBudget("cortex-m0plus", None)
    with pytest.raises(ValueError, match="no-such-chip"):
        kmt.callbacks.DeviceBudget("no-such-chip", x)
