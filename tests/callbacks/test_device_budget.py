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
