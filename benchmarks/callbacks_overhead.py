"""Step-time overhead of each schedule callback versus a plain `fit`.

For every callback the same small model is trained with and without it;
the ratio of median epoch times (epochs after the first, so tracing is
excluded; several repeats) is reported as a markdown table.

    python benchmarks/callbacks_overhead.py [--tiny] [--repeats N]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_microtune as kmt  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def _backbone(width):
    return keras.Sequential(
        [
            keras.Input((32, 3)),
            kmt.layers.FeatureStage([width, width]),
            kmt.layers.EmbeddingStage(),
            kmt.layers.OutputStage(4),
        ]
    )


def _case(name, width):
    """(model, callback) for one row; the model is compiled."""
    keras.utils.set_random_seed(0)
    model = _backbone(width)
    callback = None
    if name == "WarmupCosine":
        callback = kmt.callbacks.WarmupCosine(1e-3, warmup_steps=10, decay_steps=100)
    elif name == "ProgressiveUnfreeze":
        model = kmt.attach(model, num_classes=4)
        callback = kmt.callbacks.ProgressiveUnfreeze([2])
    elif name == "ActivationClipAnneal":
        callback = kmt.callbacks.ActivationClipAnneal(start=20.0, end=6.0, epochs=4)
    elif name == "QuantizationSchedule":
        model = kmt.optimize.quantize_model(model)
        callback = kmt.callbacks.QuantizationSchedule(1, freeze_ranges_epoch=3)
    elif name == "PruningSchedule":
        model = kmt.optimize.prune_low_magnitude(model, end_step=100, frequency=10)
        callback = kmt.callbacks.PruningSchedule()
    elif name == "DistillationSchedule":
        model = kmt.losses.Distiller(model, _backbone(width))
        callback = kmt.callbacks.DistillationSchedule(alpha=(0.9, 0.1), epochs=4)
    model.compile("adam", "sparse_categorical_crossentropy")
    return model, callback


def _baseline(name, width):
    """The same model without the callback (Distiller, QAT, pruning kept)."""
    model, _ = _case(name, width)
    return model, None


def _epoch_time(model, callback, x, y, epochs):
    timer = EpochTimer()
    callbacks = [timer] if callback is None else [callback, timer]
    model.fit(x, y, batch_size=32, epochs=epochs, callbacks=callbacks, verbose=0)
    return statistics.median(timer.times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repeats, epochs, n, width = (
        (1, 3, 128, 8) if args.tiny else (args.repeats, 6, 2048, 32)
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 32, 3)).astype("float32")
    y = rng.integers(0, 4, size=(n,))
    names = [
        "WarmupCosine",
        "ProgressiveUnfreeze",
        "ActivationClipAnneal",
        "QuantizationSchedule",
        "PruningSchedule",
        "DistillationSchedule",
    ]
    print(f"{n} samples, batch 32, {epochs} epochs, median of {repeats} runs\n")
    print("| callback | plain epoch (s) | with callback (s) | ratio |")
    print("|---|---|---|---|")
    for name in names:
        plain, timed = [], []
        for _ in range(repeats):
            plain.append(_epoch_time(*_baseline(name, width), x, y, epochs))
            timed.append(_epoch_time(*_case(name, width), x, y, epochs))
        p, t = statistics.median(plain), statistics.median(timed)
        print(f"| {name} | {p:.4f} | {t:.4f} | {t / p:.3f} |")


if __name__ == "__main__":
    main()
