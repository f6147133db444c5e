"""Overhead of each callback versus the same training without it.

Every row trains the same small model twice, side by side: once with the
callback and once the plain Keras way (the same wrapped model and optimizer
without the callback; for ActivationClipAnneal, the same ReLUs with a fixed
`max_value`; for ProgressiveUnfreeze, two `fit` calls with a manual unfreeze
and recompile between them). Reported per row, as medians over
several repeats:

- step ratio: median train-step period with the callback / without (the
  period from one step's start to the next, every callback's batch hooks
  included; retracing steps are outliers the median ignores); this is the
  per-step cost the schedule callbacks target (< 1.03);
- fit ratio: whole `fit` wall time with / without, so one-off costs
  (retracing, rebuilding the optimizer, DeviceBudget's conversions) show;
- own time: seconds the callback itself reports spending (DeviceBudget's
  conversions), and the fit time left over once that is taken off.

    python benchmarks/callbacks_overhead.py [--tiny] [--repeats N]
"""

import argparse
import gc
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_microtune as kmt  # noqa: E402
from keras_microtune.callbacks._base import sublayers  # noqa: E402
from keras_microtune.callbacks.progressive_unfreeze import (  # noqa: E402
    _top_level_layers,
)

UNFREEZE_EPOCH = 2
CLIP_START = 20.0
# Plain against plain (A/A): how far from 1.00 noise alone puts a ratio.
CONTROL = "none (noise floor)"


class FitTimer(keras.callbacks.Callback):
    """Epoch durations and train-step periods, over one or more fits.

    A step period runs from one `on_train_batch_begin` to the next within an
    epoch, so it holds the step and every callback's batch hooks, whatever
    their place in the callback list.
    """

    def __init__(self):
        super().__init__()
        self.times = []  # seconds per epoch
        self.steps = []  # seconds per train step (per execution), hooks included
        self._step_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._step_start = None

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._epoch_start)

    def on_train_batch_begin(self, batch, logs=None):
        now = time.perf_counter()
        if self._step_start is not None:
            self.steps.append(now - self._step_start)
        self._step_start = now


def _backbone(width):
    return keras.Sequential(
        [
            keras.Input((32, 3)),
            kmt.layers.FeatureStage([width, width]),
            kmt.layers.EmbeddingStage(),
            kmt.layers.OutputStage(4),
        ]
    )


def _model(name, width):
    """The compiled model a row trains, the same with and without callback."""
    keras.utils.set_random_seed(0)
    model = _backbone(width)
    if name == "ProgressiveUnfreeze":
        model = kmt.attach(model, num_classes=4)
    elif name == "QuantizationSchedule":
        model = kmt.optimize.quantize_model(model)
    elif name == "PruningSchedule":
        model = kmt.optimize.prune_low_magnitude(model, end_step=100, frequency=10)
    elif name == "DistillationSchedule":
        model = kmt.losses.Distiller(model, _backbone(width))
    elif name == "ActivationClipAnneal":
        # Without the callback, Keras' own clip: a fixed `max_value` (relu and
        # clip ops); the callback swaps it for a min with its variable.
        for layer in sublayers(model):
            if isinstance(layer, keras.layers.ReLU):
                layer.max_value = CLIP_START
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def _callback(name, x):
    if name == CONTROL:
        return None
    if name == "WarmupCosine":
        return kmt.callbacks.WarmupCosine(1e-3, warmup_steps=10, decay_steps=100)
    if name == "ProgressiveUnfreeze":
        return kmt.callbacks.ProgressiveUnfreeze([UNFREEZE_EPOCH])
    if name == "ActivationClipAnneal":
        return kmt.callbacks.ActivationClipAnneal(start=CLIP_START, end=6.0, epochs=4)
    if name == "QuantizationSchedule":
        return kmt.callbacks.QuantizationSchedule(1, freeze_ranges_epoch=3)
    if name == "PruningSchedule":
        return kmt.callbacks.PruningSchedule()
    if name == "DistillationSchedule":
        return kmt.callbacks.DistillationSchedule(alpha=(0.9, 0.1), epochs=4)
    if name == "DeviceBudget":
        return kmt.callbacks.DeviceBudget("cortex-m4", x[:64])
    raise ValueError(f"unknown row {name!r}")


def _plain_unfreeze(model, x, y, epochs, timer):
    """What a Keras user writes without the callback: fit, unfreeze, refit."""
    fit = dict(batch_size=32, callbacks=[timer], verbose=0)
    model.fit(x, y, epochs=UNFREEZE_EPOCH, **fit)
    # The layer ProgressiveUnfreeze's "auto" picks: the topmost frozen one
    # with weights; its BatchNorm layers stay frozen, as the callback keeps them.
    frozen = [
        layer
        for layer in _top_level_layers(model)
        if not layer.trainable
        and layer.weights
        and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    frozen[-1].trainable = True
    for inner in sublayers(frozen[-1]):
        if isinstance(inner, keras.layers.BatchNormalization):
            inner.trainable = False
    # Keras needs a new optimizer for the new variables (its state is lost).
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, initial_epoch=UNFREEZE_EPOCH, **fit)


def _run(name, width, x, y, epochs, with_callback):
    """(median step period s, fit wall s, callback's own s) for one run."""
    keras.backend.clear_session()  # Every run starts from the same state.
    gc.collect()
    model = _model(name, width)
    timer = FitTimer()
    callback = _callback(name, x) if with_callback else None
    start = time.perf_counter()
    if name == "ProgressiveUnfreeze" and not with_callback:
        _plain_unfreeze(model, x, y, epochs, timer)
    else:
        callbacks = [timer] if callback is None else [callback, timer]
        model.fit(x, y, batch_size=32, epochs=epochs, callbacks=callbacks, verbose=0)
    wall = time.perf_counter() - start
    own = getattr(callback, "seconds", 0.0) if callback is not None else 0.0
    return statistics.median(timer.steps), wall, own


NAMES = (
    CONTROL,
    "WarmupCosine",
    "ProgressiveUnfreeze",
    "ActivationClipAnneal",
    "QuantizationSchedule",
    "PruningSchedule",
    "DistillationSchedule",
    "DeviceBudget",
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run")
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    repeats, epochs, n, width = (
        (1, 3, 128, 8) if args.tiny else (args.repeats, 6, 2048, 32)
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 32, 3)).astype("float32")
    y = rng.integers(0, 4, size=(n,))
    print(
        f"{n} samples, batch 32, {epochs} epochs; {repeats} side-by-side pairs "
        "of runs (plain, callback), ratios within each pair, median over pairs\n"
    )
    print(
        "| callback | plain step (ms) | with callback step (ms) | step ratio "
        "| fit ratio | callback's own time (s) | fit ratio without it |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in NAMES:
        plain, timed = [], []
        for i in range(repeats):
            # Side by side, alternating which goes first, so drift cancels.
            pair = (False, True) if i % 2 == 0 else (True, False)
            runs = {w: _run(name, width, x, y, epochs, w) for w in pair}
            plain.append(runs[False])
            timed.append(runs[True])
        step_p = statistics.median(r[0] for r in plain)
        step_t = statistics.median(r[0] for r in timed)
        # Ratios are taken within each pair, then the median over pairs.
        step_ratio = statistics.median(t[0] / p[0] for p, t in zip(plain, timed))
        fit_ratio = statistics.median(t[1] / p[1] for p, t in zip(plain, timed))
        own = statistics.median(r[2] for r in timed)
        rest = statistics.median((t[1] - t[2]) / p[1] for p, t in zip(plain, timed))
        print(
            f"| {name} | {1e3 * step_p:.2f} | {1e3 * step_t:.2f} | "
            f"{step_ratio:.3f} | {fit_ratio:.3f} | {own:.2f} | {rest:.3f} |"
        )


if __name__ == "__main__":
    main()
