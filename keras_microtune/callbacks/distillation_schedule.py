"""DistillationSchedule: the distillation weight and temperature by epoch."""

import keras

from keras_microtune.callbacks._base import check_number, check_schedule, schedule_value


class DistillationSchedule(keras.callbacks.Callback):
    """Schedule `alpha` and `temperature` of a `kmt.losses.Distiller`.

    A common recipe leans on the teacher early (high `alpha`, high
    temperature) and on the labels late. Each value is a number (constant), a
    `(start, end)` pair moved linearly from `start_epoch` to
    `start_epoch + epochs`, a callable `epoch -> value`, or None (left as the
    Distiller has it). The values are assigned at the start of each epoch to
    the Distiller's non-trainable variables, which the compiled train step
    reads, and go into the epoch `logs` as `"distillation_alpha"` and
    `"distillation_temperature"`. On `BackupAndRestore` resume they are
    recomputed from the epoch index (and restored with the model's weights).

    Args:
        alpha: schedule of the distillation-loss weight, in [0, 1]; the task
            loss gets `1 - alpha`. Defaults to `(0.9, 0.1)`.
        temperature: schedule of the softening temperature, > 0. Defaults to
            `None`.
        epochs: int. Length of the `(start, end)` ramps. Defaults to `10`.
        start_epoch: int. Epoch where the ramps start. Defaults to `0`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> def mlp():
    ...     layers = [keras.Input((4,)), keras.layers.Dense(3, "softmax")]
    ...     return keras.Sequential(layers)
    >>> teacher, student = mlp(), mlp()
    >>> distiller = kmt.losses.Distiller(student, teacher)
    >>> distiller.compile("adam", "sparse_categorical_crossentropy")
    >>> schedule = kmt.callbacks.DistillationSchedule(alpha=(1.0, 0.0), epochs=2)
    >>> history = distiller.fit(np.ones((8, 4)), np.zeros(8), epochs=3,
    ...                         callbacks=[schedule], verbose=0)
    >>> history.history["distillation_alpha"]
    [1.0, 0.5, 0.0]
    """

    def __init__(
        self, alpha=(0.9, 0.1), temperature=None, epochs: int = 10, start_epoch=0
    ):
        super().__init__()
        self.alpha = None if alpha is None else check_schedule("alpha", alpha, 0, 1)
        if temperature is not None:
            check_schedule("temperature", temperature, low=1e-6)
        self.temperature = temperature
        self.epochs = check_number("epochs", epochs, low=0, integer=True)
        self.start_epoch = check_number("start_epoch", start_epoch, 0, integer=True)
        if isinstance(temperature, list):
            self.temperature = tuple(temperature)

    def values(self, epoch: int) -> dict:
        """The scheduled values at `epoch`, by log name."""
        result = {}
        for name, spec in (("alpha", self.alpha), ("temperature", self.temperature)):
            if spec is not None:
                result[name] = schedule_value(
                    spec, epoch, self.epochs, self.start_epoch
                )
        return result

    def on_train_begin(self, logs=None):
        model = self.model
        ok = all(
            isinstance(getattr(model, name, None), keras.Variable)
            for name in ("alpha", "temperature")
        )
        if not ok:
            raise ValueError(
                "DistillationSchedule needs a model with `alpha` and `temperature` "
                f"variables; model {model.name!r} has none. Wrap the student: "
                "`kmt.losses.Distiller(student, teacher)`, compile and fit that."
            )

    def on_epoch_begin(self, epoch, logs=None):
        for name, value in self.values(epoch).items():
            if name == "alpha" and not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"DistillationSchedule: `alpha` must stay in [0, 1]; the "
                    f"schedule gave {value} at epoch {epoch}."
                )
            getattr(self.model, name).assign(value)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["distillation_alpha"] = float(self.model.alpha.numpy())
            logs["distillation_temperature"] = float(self.model.temperature.numpy())
