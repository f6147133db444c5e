"""QuantizationSchedule: the quantization-aware training recipe by epoch."""

import keras

from keras_microtune.callbacks._base import check_number

# Names of the per-quantizer flag variables that `kmt.optimize` creates.
_ENABLED = "quant_enabled"


class QuantizationSchedule(keras.callbacks.Callback):
    """Start fake quantization at an epoch, later freeze ranges and BatchNorm.

    The standard QAT recipe: train (or fine-tune) in float first, switch on
    fake quantization at `start_epoch`, stop updating activation ranges at
    `freeze_ranges_epoch` and switch folded BatchNorm layers to their moving
    statistics at `freeze_batch_norm_epoch`. It drives the flag variables of
    a model returned by `kmt.optimize.quantize_model`, which the compiled
    train step reads, so nothing is retraced. Before `start_epoch` training
    steps compute in float while ranges are still learned; evaluation always
    simulates int8.

    At each epoch start the flags are set from the epoch index (so a
    `BackupAndRestore` resume gets them right), and the epoch `logs` get
    `"quantization_enabled"`, `"ranges_frozen"` and `"batch_norm_frozen"`
    (1.0 or 0.0).

    Args:
        start_epoch: int. First epoch with fake quantization. Defaults to `0`.
        freeze_ranges_epoch: int or None. First epoch with frozen activation
            ranges; None never freezes. Defaults to `None`.
        freeze_batch_norm_epoch: int or None. First epoch where folded
            BatchNorm uses moving statistics; None never. Defaults to `None`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> qat = kmt.optimize.quantize_model(model)
    >>> qat.compile("adam", "mse")
    >>> schedule = kmt.callbacks.QuantizationSchedule(start_epoch=1)
    >>> history = qat.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=2,
    ...                   callbacks=[schedule], verbose=0)
    >>> history.history["quantization_enabled"]
    [0.0, 1.0]
    """

    def __init__(
        self,
        start_epoch: int = 0,
        freeze_ranges_epoch=None,
        freeze_batch_norm_epoch=None,
    ):
        super().__init__()
        self.start_epoch = check_number("start_epoch", start_epoch, 0, integer=True)
        for name, value in (
            ("freeze_ranges_epoch", freeze_ranges_epoch),
            ("freeze_batch_norm_epoch", freeze_batch_norm_epoch),
        ):
            if value is not None:
                check_number(name, value, low=start_epoch, integer=True)
        self.freeze_ranges_epoch = freeze_ranges_epoch
        self.freeze_batch_norm_epoch = freeze_batch_norm_epoch
        self._state = None

    def state(self, epoch: int) -> dict:
        """The flags at `epoch`, by log name."""

        def reached(start):
            return float(start is not None and epoch >= start)

        return {
            "quantization_enabled": reached(self.start_epoch),
            "ranges_frozen": reached(self.freeze_ranges_epoch),
            "batch_norm_frozen": reached(self.freeze_batch_norm_epoch),
        }

    def on_train_begin(self, logs=None):
        if not any(v.name == _ENABLED for v in self.model.variables):
            raise ValueError(
                f"QuantizationSchedule: model {self.model.name!r} has no fake-"
                "quantization layers. Make it quantization-aware first: "
                "`model = kmt.optimize.quantize_model(model)`, then compile and "
                "fit that model with this callback."
            )
        self._state = None

    def on_epoch_begin(self, epoch, logs=None):
        from keras_microtune import optimize

        state = self.state(epoch)
        if state == self._state:
            return
        optimize.set_quantization_enabled(self.model, state["quantization_enabled"])
        optimize.freeze_ranges(self.model, state["ranges_frozen"])
        optimize.freeze_batch_norm(self.model, state["batch_norm_frozen"])
        self._state = state

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._state is not None:
            logs.update(self._state)
