"""DeviceBudget: convert at epoch end and check size and arena against a target."""

import math
import time
import warnings

import keras

from keras_microtune._api import KerasMicrotuneWarning
from keras_microtune.callbacks._base import (
    check_number,
    from_chief,
    multi_worker_strategy,
)

ON_EXCEED = ("warn", "stop")


class DeviceBudget(keras.callbacks.Callback):
    """Convert the model every `every` epochs and check it fits a device.

    At the end of every `every`-th epoch the current model is converted with
    `kmt.convert(model, target, representative_data)` (int8 for the
    microcontroller targets), which measures the flatbuffer size and the
    tensor arena in the TFLite Micro interpreter. The epoch `logs` get
    `"int8_size_bytes"`, `"arena_bytes"` and `"fits_target"` (1.0 / 0.0; the
    latest measurement, NaN before the first). When the model is over the
    target's flash or RAM budget, the callback warns with a
    `KerasMicrotuneWarning`, and with `on_exceed="stop"` also stops training.

    The first epoch of a `fit` that starts past epoch 0 (a `BackupAndRestore`
    resume, or `initial_epoch > 0`) is always measured as well, so the logs
    of a resumed run are never NaN. A model with pruning wrappers
    (`kmt.optimize.prune_low_magnitude`) is measured as deployed: `kmt.convert`
    converts a copy stripped with `kmt.optimize.strip`. The model may have been
    built and compiled under a `tf.distribute` strategy. Under a
    `MultiWorkerMirroredStrategy` only the chief converts (`result` is None
    on the other workers); its figures reach every worker's `logs`, and
    `on_exceed="stop"` stops them all.

    A conversion costs seconds (conversion, calibration and the arena search);
    `seconds` holds the total time spent, and `every` keeps it a small share
    of training.

    Args:
        target: str. A name from `kmt.targets.available()` with a RAM or flash
            budget, e.g. `"cortex-m0plus"`.
        representative_data: calibration inputs, as for `kmt.convert` (a
            small array of training inputs is enough).
        every: int. Check every this many epochs. Defaults to `1`.
        on_exceed: `"warn"` or `"stop"`. Defaults to `"warn"`.
        patch_inference: passed to `kmt.convert`: `"auto"` measures the arena
            with patch-based inference, so a model that fits only with it is
            logged as fitting. Defaults to `None`.

    Example:

    >>> budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x_train[:64])
    >>> model.fit(x_train, y_train, epochs=5, callbacks=[budget])
    """

    def __init__(
        self,
        target,
        representative_data,
        every: int = 1,
        on_exceed="warn",
        patch_inference=None,
    ):
        super().__init__()
        from keras_microtune.export import patch_inference as patch_lib
        from keras_microtune.export import targets

        self.target = targets.get(target)
        self.patch_inference = patch_inference
        patch_lib.check_option(patch_inference, self.target)  # Fail before fit.
        if representative_data is None:
            raise ValueError(
                "Received an invalid value for `representative_data`, expected "
                "calibration inputs (an array, `(x, y)`, a tf.data.Dataset or a "
                "`.npz` path). Received: representative_data=None"
            )
        self.representative_data = representative_data
        self.every = check_number("every", every, low=1, integer=True)
        if on_exceed not in ON_EXCEED:
            raise ValueError(
                "Received an invalid value for `on_exceed`, expected one of "
                f"{list(ON_EXCEED)}. Received: on_exceed={on_exceed!r}"
            )
        self.on_exceed = on_exceed
        self.seconds = 0.0
        self.result = None
        self._last = None
        self._first_epoch = True

    def on_train_begin(self, logs=None):
        self.seconds = 0.0
        self.result = None
        self._first_epoch = True
        self._last = {
            "int8_size_bytes": math.nan,
            "arena_bytes": math.nan,
            "fits_target": math.nan,
        }

    def _measure(self):
        from keras_microtune.export.converter import convert

        start = time.perf_counter()
        result = convert(  # Strips pruning wrappers: measures what deploys.
            self.model,
            self.target,
            representative_data=self.representative_data,
            verbose=0,
            patch_inference=self.patch_inference,
        )
        self.seconds += time.perf_counter() - start
        self.result = result
        arena = result.arena_bytes
        self._last = {
            "int8_size_bytes": float(result.size_bytes),
            "arena_bytes": math.nan if arena is None else float(arena),
            "fits_target": float(result.fits),
        }
        return result

    def on_epoch_end(self, epoch, logs=None):
        resumed = self._first_epoch and epoch > 0
        self._first_epoch = False
        if resumed or (epoch + 1) % self.every == 0:
            strategy = multi_worker_strategy(self.model)
            if strategy is None or strategy.extended.should_checkpoint:
                self._measure()  # Multi-worker: on the chief only.
            if strategy is not None:  # Every worker logs (and stops) alike.
                keys = list(self._last)
                values = from_chief(strategy, [self._last[k] for k in keys])
                self._last = dict(zip(keys, values))
            if self._last["fits_target"] == 0.0:
                self._exceeded(epoch)
        if logs is not None:
            logs.update(self._last)

    def _exceeded(self, epoch):
        target = self.target
        size, arena = int(self._last["int8_size_bytes"]), self._last["arena_bytes"]
        budget = []
        if target.flash_bytes is not None:
            budget.append(f"flatbuffer {size} of {target.flash_bytes} bytes flash")
        if target.ram_bytes is not None and not math.isnan(arena):
            budget.append(f"arena {int(arena)} of {target.ram_bytes} bytes RAM")
        action = (
            "Stopping training." if self.on_exceed == "stop" else "Training goes on."
        )
        warnings.warn(
            f"DeviceBudget: after epoch {epoch} the model no longer fits "
            f"{target.name!r} ({'; '.join(budget)}). {action} Shrink the model "
            "(fewer filters or units, pruning) or pick a larger target.",
            KerasMicrotuneWarning,
            stacklevel=2,
        )
        if self.on_exceed == "stop":
            self.model.stop_training = True
