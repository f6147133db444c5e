import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import keras_microtune as kmt


def _pair(seed=0):
    keras.utils.set_random_seed(seed)
    teacher = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]
    )
    student = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]
    )
    return student, teacher


def _data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, size=(n,))


def _expected_loss(student, teacher, x, y, alpha, temperature):
    p_s, p_t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
    task = np.mean(-np.log(p_s[np.arange(len(y)), y]))

    def soft(p):
        return np.exp(np.log(p) / temperature) / np.exp(np.log(p) / temperature).sum(
            -1, keepdims=True
        )  # noqa: E731

    s_t, s_s = soft(p_t), soft(p_s)
    distill = np.mean(np.sum(s_t * np.log(s_t / s_s), axis=-1)) * temperature**2
    return (1 - alpha) * task + alpha * distill


@pytest.mark.parametrize("distributed", [False, True])
def test_schedule_values_reach_the_compiled_loss(distributed, mirrored):
    x, y = _data()
    scope = mirrored.scope() if distributed else keras.name_scope("local")
    with scope:
        student, teacher = _pair()
        distiller = kmt.losses.Distiller(student, teacher)
        # Learning rate 0: the loss changes only through alpha and temperature.
        distiller.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    schedule = kmt.callbacks.DistillationSchedule(
        alpha=(1.0, 0.0), temperature=(4.0, 1.0), epochs=3
    )
    history = distiller.fit(
        x, y, batch_size=4, epochs=4, callbacks=[schedule], verbose=0
    )
    assert history.history["distillation_alpha"] == pytest.approx(
        [1.0, 2 / 3, 1 / 3, 0.0]
    )
    assert history.history["distillation_temperature"] == pytest.approx(
        [4.0, 3.0, 2.0, 1.0]
    )
    expected = [
        _expected_loss(student, teacher, x, y, a, t)
        for a, t in zip([1.0, 2 / 3, 1 / 3, 0.0], [4.0, 3.0, 2.0, 1.0])
    ]
    np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-4)


def test_distillation_improves_a_student_on_digits():
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], digits.target[order]
    x_test, y_test = x[1000:], y[1000:]
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    teacher.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    teacher.fit(x[:1000], y[:1000], epochs=20, batch_size=64, verbose=0)
    accuracy = {}
    for distill in (False, True):
        keras.utils.set_random_seed(0)
        student = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        distiller = kmt.losses.Distiller(student, teacher, alpha=0.0, temperature=4.0)
        distiller.compile(
            keras.optimizers.Adam(1e-2),
            "sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        callbacks = (
            [kmt.callbacks.DistillationSchedule(alpha=(0.9, 0.5), epochs=40)]
            if distill
            else []
        )
        # The student sees only 100 labelled digits; the teacher saw 1000.
        distiller.fit(
            x[:100], y[:100], epochs=40, batch_size=32, verbose=0, callbacks=callbacks
        )
        accuracy[distill] = distiller.evaluate(x_test, y_test, verbose=0)[1]
    # Measured: 0.897 without, 0.923 with distillation (seed 0; 0.90 -> 0.92
    # and 0.88 -> 0.89 with seeds 1 and 2).
    assert accuracy[True] >= accuracy[False] + 0.01, accuracy


def test_backup_and_restore_resume(tmp_path, interrupt_at):
    x, y = _data()

    def fit(*extra):
        distiller = kmt.losses.Distiller(*_pair())
        distiller.compile("adam", "sparse_categorical_crossentropy")
        callbacks = [
            keras.callbacks.BackupAndRestore(str(tmp_path)),
            kmt.callbacks.DistillationSchedule(alpha=lambda e: 1.0 / (e + 1)),
            *extra,
        ]
        return distiller, distiller.fit(x, y, epochs=4, callbacks=callbacks, verbose=0)

    with pytest.raises(RuntimeError, match="interrupted"):
        fit(interrupt_at(2))
    distiller, history = fit()
    assert history.history["distillation_alpha"] == pytest.approx([1 / 3, 1 / 4])
    assert history.history["distillation_temperature"] == pytest.approx([4.0, 4.0])


def test_losses_api():
    teacher = np.array([[2.0, 0.0, -1.0]], dtype="float32")
    assert float(kmt.losses.distillation_loss(teacher, teacher)[0]) == pytest.approx(
        0.0, abs=1e-6
    )
    student = np.array([[0.0, 0.0, 0.0]], dtype="float32")
    loss = kmt.losses.DistillationLoss(temperature=2.0)
    value = float(loss(teacher, student))
    p = np.exp(teacher[0] / 2) / np.exp(teacher[0] / 2).sum()
    assert value == pytest.approx(4.0 * np.sum(p * np.log(p * 3)), rel=1e-5)
    with pytest.raises(ValueError, match="invalid value for `temperature`"):
        kmt.losses.DistillationLoss(temperature=0)
    with pytest.raises(
        ValueError, match="invalid value for `alpha`.*Received: alpha=2"
    ):
        kmt.losses.Distiller(*_pair(), alpha=2)
    with pytest.raises(TypeError, match="invalid value for `teacher`"):
        kmt.losses.Distiller(_pair()[0], teacher="model")


def test_invalid_arguments_and_missing_distiller():
    with pytest.raises(ValueError, match="invalid value for `alpha`.*Received: alpha="):
        kmt.callbacks.DistillationSchedule(alpha=(0.5, 1.5))
    with pytest.raises(ValueError, match="invalid value for `temperature`"):
        kmt.callbacks.DistillationSchedule(temperature=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="invalid value for `epochs`"):
        kmt.callbacks.DistillationSchedule(epochs=-1)
    student, _ = _pair()
    student.compile("adam", "sparse_categorical_crossentropy")
    x, y = _data()
    with pytest.raises(ValueError, match=r"kmt.losses.Distiller\(student, teacher\)"):
        student.fit(x, y, verbose=0, callbacks=[kmt.callbacks.DistillationSchedule()])
