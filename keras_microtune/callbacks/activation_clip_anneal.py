"""ActivationClipAnneal: anneal ReLU clipping toward an int8-friendly value."""

import keras

from keras_microtune._api import strategy_scope
from keras_microtune.callbacks._base import (
    check_number,
    retrace,
    schedule_value,
    sublayers,
)


def _clipped_call(layer, clip):
    """A `call` for ReLU `layer` whose upper limit is read from `clip`."""
    relu = keras.activations.relu

    def call(inputs):
        outputs = relu(
            inputs,
            negative_slope=layer.negative_slope,
            threshold=layer.threshold,
        )
        return keras.ops.minimum(outputs, keras.ops.cast(clip, outputs.dtype))

    return call


class ActivationClipAnneal(keras.callbacks.Callback):
    """Anneal the clipping value of ReLU layers, e.g. from 20 down to 6.

    Unbounded activations waste int8 range on rare large values; a ReLU6-like
    clip quantizes well. Switching the clip on abruptly costs accuracy, so
    this callback lowers `max_value` of `keras.layers.ReLU` layers (including
    those inside `FeatureStage` and nested models) linearly from `start` at
    `start_epoch` to `end` at `start_epoch + epochs`, and keeps `end` after.
    Before `start_epoch` the layers keep their own `max_value`.

    From `start_epoch` until training ends, the chosen ReLU layers read their
    upper limit from one non-trainable variable owned by the callback (not a
    model weight, so checkpoints are unchanged); each epoch only assigns it,
    so the compiled train step is traced once, not once per value. The value
    goes into the epoch `logs` as `"activation_clip"` (`inf` before
    `start_epoch`); on `BackupAndRestore` resume it is recomputed from the
    epoch index. Each layer's `max_value` follows the value too (so a
    `ModelCheckpoint` config has it), and when training ends the layers go
    back to their own `call` with `max_value` at the final value.

    Args:
        start: float. Clipping value at `start_epoch`. Defaults to `20.0`.
        end: float. Final clipping value. Defaults to `6.0`.
        epochs: int. Epochs over which the value moves from `start` to `end`.
            Defaults to `5`.
        start_epoch: int. First annealed epoch. Defaults to `0`.
        layers: None or list of str. Names of the ReLU layers to clip; None
            means every `keras.layers.ReLU` in the model. Defaults to `None`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.ReLU(), keras.layers.Dense(1)])
    >>> model.compile("adam", "mse")
    >>> anneal = kmt.callbacks.ActivationClipAnneal(start=12.0, end=6.0, epochs=2)
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=3,
    ...                     callbacks=[anneal], verbose=0)
    >>> history.history["activation_clip"]
    [12.0, 9.0, 6.0]
    """

    def __init__(
        self,
        start: float = 20.0,
        end: float = 6.0,
        epochs: int = 5,
        start_epoch: int = 0,
        layers=None,
    ):
        super().__init__()
        self.start = check_number("start", start, low=0, low_open=True)
        self.end = check_number("end", end, low=0, low_open=True)
        self.epochs = check_number("epochs", epochs, low=0, integer=True)
        self.start_epoch = check_number("start_epoch", start_epoch, 0, integer=True)
        if layers is not None and (
            not isinstance(layers, (list, tuple))
            or not all(isinstance(name, str) for name in layers)
        ):
            raise ValueError(
                "Received an invalid value for `layers`, expected None or a list "
                f"of ReLU layer names. Received: layers={layers!r}"
            )
        self.layers = None if layers is None else list(layers)
        self._relus = []
        self._current = None
        self._clip = None

    def value(self, epoch: int):
        """The clipping value at `epoch`, or None before `start_epoch`."""
        if epoch < self.start_epoch:
            return None
        return schedule_value(
            (self.start, self.end), epoch, self.epochs, self.start_epoch
        )

    def _find_relus(self):
        relus = [
            layer
            for layer in sublayers(self.model)
            if isinstance(layer, keras.layers.ReLU)
        ]
        if self.layers is None:
            if not relus:
                raise ValueError(
                    "ActivationClipAnneal found no `keras.layers.ReLU` layer in "
                    f"model {self.model.name!r}. Use `keras.layers.ReLU()` layers "
                    "(or `kmt.layers.FeatureStage`) rather than `activation='relu'` "
                    "arguments for the activations to clip."
                )
            return relus
        by_name = {layer.name: layer for layer in relus}
        missing = [name for name in self.layers if name not in by_name]
        if missing:
            raise ValueError(
                f"ActivationClipAnneal: no ReLU layer named {missing} in model "
                f"{self.model.name!r}. ReLU layers: {sorted(by_name)}."
            )
        return [by_name[name] for name in self.layers]

    def on_train_begin(self, logs=None):
        self._relus = self._find_relus()
        self._current = None
        self._clip = None
        if any("call" in vars(layer) for layer in self._relus):
            # Left by an earlier fit that raised before `on_train_end`.
            self._uninstall()

    def _install(self):
        """Make the layers read their limit from a variable (one retrace)."""
        with strategy_scope(self.model):
            self._clip = keras.Variable(
                float("inf"), dtype="float32", trainable=False, name="activation_clip"
            )
        for layer in self._relus:
            # An instance attribute shadows `ReLU.call`; removed in `_uninstall`.
            object.__setattr__(layer, "call", _clipped_call(layer, self._clip))
        retrace(self.model)

    def _uninstall(self):
        for layer in self._relus:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")
        self._clip = None
        retrace(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        value = self.value(epoch)
        if value is None or value == self._current:
            return
        if self._clip is None:
            self._install()
        self._clip.assign(value)
        for layer in self._relus:
            layer.max_value = value
        self._current = value

    def on_train_end(self, logs=None):
        if self._clip is not None:
            self._uninstall()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            unclipped = self._current is None
            logs["activation_clip"] = float("inf") if unclipped else self._current
