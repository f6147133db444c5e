"""Knowledge distillation: a loss and a `Distiller` model usable inside `fit`."""

import keras
from keras import ops

from keras_microtune._api import serializable


def _log_soft(outputs, temperature, from_logits):
    """Log of the temperature-softened distribution of `outputs`."""
    outputs = ops.cast(outputs, "float32")
    if not from_logits:
        # softmax(log(p) / T) is p ** (1 / T), renormalised.
        outputs = ops.log(ops.clip(outputs, 1e-7, 1.0))
    return ops.log_softmax(outputs / temperature, axis=-1)


def distillation_loss(
    teacher_outputs, student_outputs, temperature=4.0, from_logits=True
):
    """Per-sample KL(teacher || student) of softened outputs, times `T**2`.

    The `T**2` factor (Hinton et al., 2015) keeps the gradient scale of the
    soft targets independent of the temperature.

    Args:
        teacher_outputs: tensor `(batch, classes)`. Teacher logits or
            probabilities.
        student_outputs: tensor `(batch, classes)`. Student logits or
            probabilities.
        temperature: float or scalar tensor. Softening temperature, > 0.
            Defaults to `4.0`.
        from_logits: bool. Whether the outputs are logits (True) or
            probabilities (False). Defaults to `True`.

    Returns:
        A float32 tensor of shape `(batch,)`.
    """
    temperature = ops.cast(temperature, "float32")
    log_teacher = _log_soft(teacher_outputs, temperature, from_logits)
    log_student = _log_soft(student_outputs, temperature, from_logits)
    kl = ops.sum(ops.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    return kl * ops.square(temperature)


@serializable
class DistillationLoss(keras.losses.Loss):
    """`distillation_loss` as a Keras loss: `y_true` holds the teacher outputs.

    Use it to compile a student against precomputed teacher outputs, or let
    `Distiller` run the teacher for you.

    Args:
        temperature: float. Softening temperature, > 0. Defaults to `4.0`.
        from_logits: bool. Whether outputs are logits. Defaults to `True`.
    """

    def __init__(
        self, temperature=4.0, from_logits=True, name="distillation", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(
                "Received an invalid value for `temperature`, expected a positive "
                f"number. Received: temperature={temperature!r}"
            )
        self.temperature = float(temperature)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        return distillation_loss(y_true, y_pred, self.temperature, self.from_logits)

    def get_config(self):
        return {
            **super().get_config(),
            "temperature": self.temperature,
            "from_logits": self.from_logits,
        }


def _check_weight(name, value, low, high=None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value >= low if low == 0 else value > low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        expected = (
            f"a number in [{low}, {high}]" if high is not None else "a number > 0"
        )
        raise ValueError(
            f"Received an invalid value for `{name}`, expected {expected}. "
            f"Received: {name}={value!r}"
        )


@serializable
class Distiller(keras.Model):
    """A student trained on `(1 - alpha) * task loss + alpha * distillation loss`.

    Compile it with the task loss and metrics as for the student, then `fit`
    on the task data. Each training step also runs the frozen `teacher`
    (in inference mode) on the same inputs. `alpha` and `temperature` are
    non-trainable variables of the model, so `DistillationSchedule` can change
    them during `fit` (the compiled train step reads them) and
    `BackupAndRestore` restores them. Predictions are the student's; export
    `distiller.student`.

    Args:
        student: keras.Model. The model to train.
        teacher: keras.Model. A trained model with the same output shape; it
            is frozen.
        alpha: float in [0, 1]. Weight of the distillation loss. Defaults to
            `0.5`.
        temperature: float > 0. Softening temperature. Defaults to `4.0`.
        from_logits: bool. Whether student and teacher output logits (True)
            or probabilities, e.g. after softmax (False). Defaults to `False`,
            matching `kmt.layers.OutputStage`'s softmax.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> def mlp():
    ...     layers = [keras.Input((4,)), keras.layers.Dense(3, "softmax")]
    ...     return keras.Sequential(layers)
    >>> teacher, student = mlp(), mlp()
    >>> distiller = kmt.losses.Distiller(student, teacher, alpha=0.5)
    >>> distiller.compile("adam", "sparse_categorical_crossentropy")
    >>> history = distiller.fit(np.ones((8, 4)), np.zeros(8), verbose=0)
    """

    def __init__(
        self, student, teacher, alpha=0.5, temperature=4.0, from_logits=False, **kwargs
    ):
        super().__init__(**kwargs)
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"Received an invalid value for `{name}`, expected a keras.Model. "
                    f"Received: {name} of type {type(model).__name__}"
                )
        _check_weight("alpha", alpha, 0, 1)
        _check_weight("temperature", temperature, 0)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.from_logits = bool(from_logits)
        self.alpha = keras.Variable(float(alpha), trainable=False, name="alpha")
        self.temperature = keras.Variable(
            float(temperature), trainable=False, name="temperature"
        )
        self._kl = keras.losses.KLDivergence(reduction="sum_over_batch_size")
        # The Distiller owns no weights of its own beyond the two schedules:
        # it is built when the student is (BackupAndRestore needs that).
        self.built = student.built

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        task = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        teacher = self.teacher(x, training=False)
        temperature = ops.cast(self.temperature, "float32")
        soft_teacher = ops.exp(_log_soft(teacher, temperature, self.from_logits))
        soft_student = ops.exp(_log_soft(y_pred, temperature, self.from_logits))
        # A Keras loss object, so the distributed-training loss scaling
        # matches that of the compiled task loss.
        distill = self._kl(soft_teacher, soft_student, sample_weight=sample_weight)
        distill = distill * ops.square(temperature)
        alpha = ops.cast(self.alpha, "float32")
        return (1.0 - alpha) * ops.cast(task, "float32") + alpha * distill

    def get_config(self):
        return {
            **super().get_config(),
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "alpha": float(self.alpha.numpy()),
            "temperature": float(self.temperature.numpy()),
            "from_logits": self.from_logits,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        return cls(**config)
