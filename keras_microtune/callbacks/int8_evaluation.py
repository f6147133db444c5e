"""Int8Evaluation: convert at epoch end and measure the int8 model's accuracy."""

import math
import time

import keras

from keras_microtune.callbacks._base import check_number


class Int8Evaluation(keras.callbacks.Callback):
    """Evaluate the deployed int8 model on TFLite Micro every `every` epochs.

    At the end of every `every`-th epoch the current model is converted with
    `kmt.convert(model, target, representative_data)` and the result is run
    by `kmt.evaluate(result, x, y, runtime=runtime)`. The epoch `logs` get
    `"int8_accuracy"` for classifiers (`"int8_mean_abs_error"` for
    regressors; the latest measurement, NaN before the first), so History,
    CSVLogger and TensorBoard show the float and int8 figures side by side.
    A model that starts with `Rescaling`/`Normalization` is fed `x` raw, as
    the device will be.

    Cost: one conversion (tracing, calibration on `representative_data`,
    the TFLite Micro arena search and a parity check; about a second for a
    small model on a laptop core) plus one TFLite Micro run over `x` (in a
    child process, per sample). `seconds` holds the total time spent; keep
    `x` and `representative_data` small (a few hundred samples) and raise
    `every` to keep it a small share of training.

    Args:
        x: validation inputs, raw (any form `kmt.evaluate` accepts).
        y: labels or targets; None when `x` is an `(x, y)` pair.
        target: str. Any TFLite Micro or LiteRT target. Defaults to `"mcu"`.
        representative_data: calibration inputs for `kmt.convert`; None uses
            `x`. Defaults to `None`.
        every: int. Evaluate every this many epochs. Defaults to `1`.
        runtime: `"tflm"` or `"litert"`. Defaults to `"tflm"`.
        input_type: passed to `kmt.convert`. Defaults to `None`.

    Example:

    >>> int8 = kmt.callbacks.Int8Evaluation(x_val, y_val, every=5)
    >>> history = model.fit(x, y, epochs=20, callbacks=[int8])
    >>> history.history["int8_accuracy"]
    """

    def __init__(
        self,
        x,
        y=None,
        target="mcu",
        representative_data=None,
        every: int = 1,
        runtime: str = "tflm",
        input_type=None,
    ):
        super().__init__()
        from keras_microtune.export import targets

        self.target = targets.get(target)
        if runtime not in ("tflm", "litert"):
            raise ValueError(
                "Received an invalid value for `runtime`, expected 'tflm' or "
                f"'litert'. Received: runtime={runtime!r}"
            )
        if runtime == "tflm" and not self.target.is_mcu:
            raise ValueError(
                f"runtime='tflm' needs a TFLite Micro target; {self.target.name!r} "
                "runs on LiteRT. Pass runtime='litert' or an MCU target."
            )
        self.x, self.y = x, y
        self.representative_data = representative_data
        self.every = check_number("every", every, low=1, integer=True)
        self.runtime = runtime
        self.input_type = input_type
        self.seconds = 0.0
        self.result = None
        self.metrics = None
        self._last = {}

    def on_train_begin(self, logs=None):
        self.seconds = 0.0
        self.result = None
        self.metrics = None
        self._last = {}

    def _measure(self):
        from keras_microtune.export.converter import convert
        from keras_microtune.export.evaluate import evaluate

        start = time.perf_counter()
        rep = self.representative_data
        result = convert(
            self.model,
            self.target,
            representative_data=self.x if rep is None else rep,
            input_type=self.input_type,
            verbose=0,
        )
        # evaluate() feeds raw inputs the way the device does, folded
        # preprocessing included (result.quantize_input).
        metrics = evaluate(result, self.x, self.y, runtime=self.runtime)
        self.seconds += time.perf_counter() - start
        self.result, self.metrics = result, metrics
        self._last = {
            f"int8_{k}": float(v)
            for k, v in metrics.items()
            if k in ("accuracy", "mean_abs_error")
        }

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self._measure()
        if logs is not None:
            logs.update(self._last or {"int8_accuracy": math.nan})
