import math
import shutil

import keras
import numpy as np
import pytest

import keras_microtune as kmt


def _model(optimizer=None, **compile_kwargs):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer or keras.optimizers.SGD(0.1), "mse", **compile_kwargs)
    return model


def _data(rng, n=32):
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


class RecordLearningRate(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        self.values.append(float(logs["learning_rate"]))
        self.applied.append(float(self.model.optimizer.learning_rate))

    def on_train_begin(self, logs=None):
        self.values, self.applied = [], []


def test_values_per_step_and_epoch(rng):
    x, y = _data(rng)
    schedule = kmt.callbacks.WarmupCosine(
        0.1, warmup_steps=4, decay_steps=8, initial_learning_rate=0.02
    )
    record = RecordLearningRate()
    history = _model().fit(
        x, y, batch_size=8, epochs=4, callbacks=[schedule, record], verbose=0
    )
    expected = [schedule.value(step) for step in range(16)]
    np.testing.assert_allclose(record.values, expected, rtol=1e-6)
    np.testing.assert_allclose(record.applied, expected, rtol=1e-6)
    assert expected[0] == pytest.approx(0.02)
    assert expected[4] == pytest.approx(0.1)
    assert expected[12] == pytest.approx(0.0, abs=1e-9)
    assert expected[8] == pytest.approx(0.05)
    np.testing.assert_allclose(
        history.history["learning_rate"], [expected[i] for i in (3, 7, 11, 15)]
    )


def test_min_learning_rate_and_cosine_shape():
    schedule = kmt.callbacks.WarmupCosine(1.0, decay_steps=10, min_learning_rate=0.1)
    assert schedule.value(0) == pytest.approx(1.0)
    assert schedule.value(5) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(0.5 * math.pi))
    )
    assert schedule.value(100) == pytest.approx(0.1)


def test_any_optimizer_and_steps_per_execution(rng):
    x, y = _data(rng)
    for optimizer in (keras.optimizers.Adam(1e-3), keras.optimizers.RMSprop(1e-3)):
        schedule = kmt.callbacks.WarmupCosine(0.01, warmup_steps=2, decay_steps=4)
        model = _model(optimizer, steps_per_execution=2)
        history = model.fit(
            x, y, batch_size=8, epochs=2, callbacks=[schedule], verbose=0
        )
        # Set once per execution of 2 steps: steps 0, 2 in epoch 0; 4, 6 in epoch 1.
        assert history.history["learning_rate"] == pytest.approx(
            [schedule.value(2), schedule.value(6)]
        )
        assert float(model.optimizer.learning_rate) == pytest.approx(schedule.value(6))


def test_mirrored_strategy(rng, mirrored):
    x, y = _data(rng)
    strategy = mirrored
    with strategy.scope():
        model = _model(keras.optimizers.Adam(1e-3))
    schedule = kmt.callbacks.WarmupCosine(0.01, warmup_steps=3, decay_steps=5)
    history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[schedule], verbose=0)
    assert history.history["learning_rate"] == pytest.approx(
        [schedule.value(3), schedule.value(7)]
    )


def test_learning_rate_schedule_object_is_refused(rng):
    x, y = _data(rng)
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    model = _model(keras.optimizers.SGD(decay))
    with pytest.raises(ValueError, match="LearningRateSchedule"):
        model.fit(
            x, y, epochs=1, callbacks=[kmt.callbacks.WarmupCosine(0.1)], verbose=0
        )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": 0.1, "warmup_steps": -1}, "warmup_steps"),
        ({"learning_rate": 0.1, "decay_steps": 0}, "decay_steps"),
        ({"learning_rate": 0.1, "min_learning_rate": 0.2}, "min_learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(
        ValueError, match=f"invalid value for `{name}`.*Received: {name}="
    ):
        kmt.callbacks.WarmupCosine(**kwargs)


def test_backup_and_restore_resume(rng, tmp_path, interrupt_at):
    x, y = _data(rng)
    backup = str(tmp_path / "backup")
    kwargs = {"warmup_steps": 4, "decay_steps": 8}
    model = _model()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=4,
            verbose=0,
            callbacks=[
                kmt.callbacks.WarmupCosine(0.1, **kwargs),
                keras.callbacks.BackupAndRestore(backup),
                interrupt_at(2),
            ],
        )
    schedule = kmt.callbacks.WarmupCosine(0.1, **kwargs)
    history = _model().fit(
        x,
        y,
        batch_size=8,
        epochs=4,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup), schedule],
    )
    assert history.history["learning_rate"] == pytest.approx(
        [schedule.value(11), schedule.value(15)]
    )
    shutil.rmtree(backup, ignore_errors=True)
