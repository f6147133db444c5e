"""WarmupCosine: linear warmup then cosine decay of the learning rate."""

import math
import numbers

import keras

from keras_microtune.callbacks._base import check_number, require_compiled


class WarmupCosine(keras.callbacks.Callback):
    """Linear warmup then cosine decay of the learning rate, set every step.

    At global step `s` (counted from epoch 0 as `epoch * steps_per_epoch +
    batch`, so a `BackupAndRestore` resume continues where it stopped) the
    learning rate is

    - `initial_learning_rate + (learning_rate - initial_learning_rate) * s /
      warmup_steps` while `s < warmup_steps`;
    - `min_learning_rate + (learning_rate - min_learning_rate) * (1 +
      cos(pi * t)) / 2` after, with `t = (s - warmup_steps) / decay_steps`
      clipped to 1.

    It assigns the optimizer's learning-rate variable, so it works with any
    Keras optimizer created with a float `learning_rate` (not a
    `LearningRateSchedule`, which it would fight). The current value goes into
    the batch and epoch `logs` as `"learning_rate"`. With
    `steps_per_execution > 1` the value is set once per execution.

    Args:
        learning_rate: float. Peak learning rate, reached after warmup.
        warmup_steps: int. Steps of linear warmup. Defaults to `0`.
        decay_steps: int. Steps of cosine decay after warmup. Defaults to
            `1000`.
        initial_learning_rate: float. Learning rate at step 0. Defaults to
            `0.0`.
        min_learning_rate: float. Learning rate at the end of the decay and
            after. Defaults to `0.0`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("adam", "mse")
    >>> schedule = kmt.callbacks.WarmupCosine(1e-3, warmup_steps=2, decay_steps=6)
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), batch_size=4,
    ...                     epochs=2, callbacks=[schedule], verbose=0)
    >>> len(history.history["learning_rate"])
    2
    """

    def __init__(
        self,
        learning_rate: float,
        warmup_steps: int = 0,
        decay_steps: int = 1000,
        initial_learning_rate: float = 0.0,
        min_learning_rate: float = 0.0,
    ):
        super().__init__()
        self.learning_rate = check_number("learning_rate", learning_rate, low=0)
        self.warmup_steps = check_number("warmup_steps", warmup_steps, 0, integer=True)
        self.decay_steps = check_number("decay_steps", decay_steps, 1, integer=True)
        self.initial_learning_rate = check_number(
            "initial_learning_rate", initial_learning_rate, low=0
        )
        self.min_learning_rate = check_number(
            "min_learning_rate", min_learning_rate, low=0, high=learning_rate
        )
        self._epoch = 0
        self._steps_per_epoch = None
        self._offset = 0
        self._last_batch = -1
        self._current = None

    def value(self, step: int) -> float:
        """The learning rate at global step `step`."""
        if step < self.warmup_steps:
            fraction = step / self.warmup_steps
            start = self.initial_learning_rate
            return start + (self.learning_rate - start) * fraction
        t = min((step - self.warmup_steps) / self.decay_steps, 1.0)
        low = self.min_learning_rate
        return low + (self.learning_rate - low) * 0.5 * (1.0 + math.cos(math.pi * t))

    def on_train_begin(self, logs=None):
        require_compiled(self.model, "WarmupCosine")
        config_lr = self.model.optimizer.get_config().get("learning_rate")
        if not isinstance(config_lr, numbers.Real):
            raise ValueError(
                "WarmupCosine sets the learning rate itself, but the optimizer was "
                "created with a `LearningRateSchedule` or a callable learning rate "
                f"({config_lr!r}). Create the optimizer with a float "
                "`learning_rate` (e.g. `keras.optimizers.Adam(1e-3)`) or drop "
                "WarmupCosine."
            )
        self._epoch = 0
        self._steps_per_epoch = self.params.get("steps") if self.params else None
        self._offset = 0
        self._last_batch = -1
        self._current = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _step(self, batch):
        if self._steps_per_epoch:
            return self._epoch * self._steps_per_epoch + batch
        # Unknown epoch length: count the steps of this `fit` call.
        return self._offset + batch

    def on_train_batch_begin(self, batch, logs=None):
        value = self.value(self._step(batch))
        if value != self._current:
            self.model.optimizer.learning_rate = value
            self._current = value

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch = batch
        if logs is not None:
            logs["learning_rate"] = self._current

    def on_epoch_end(self, epoch, logs=None):
        self._offset += self._last_batch + 1
        self._last_batch = -1
        if logs is not None and self._current is not None:
            logs["learning_rate"] = self._current
