"""The same QAT microtuning on the JAX and TensorFlow Keras backends.

Each backend runs in its own process (Keras fixes the backend at import):
pretrain a small backbone on digits 0-4, `attach` + `quantize_model`, fit
on 20 shots per class of digits 5-9 with `WarmupCosine` and a
`QuantizationSchedule`, then `kmt.convert` for cortex-m4 (on JAX through a
TensorFlow child process) and TFLite Micro accuracy on the test digits.
Reported per backend: median train-step time of the QAT fit (epochs after
the first, so compilation is left out), its ratio to TensorFlow's, and the
int8 TFLite Micro accuracy.

    python -m benchmarks.backends [--tiny]
    KERAS_BACKEND=jax python -m benchmarks.backends --run OUT_DIR [--tiny]

`--run` writes `OUT_DIR/run.json` (figures and logs), `qat.keras`,
`model.tflite` and `predictions.npy` (the QAT model on the test digits).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_microtune as kmt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _StepTimes(keras.callbacks.Callback):
    """Seconds from one train step's start to the next's, per epoch."""

    def on_train_begin(self, logs=None):
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None:
            self.epochs[-1].append(now - self._last)
        self._last = now


def backbone():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            kmt.layers.FeatureStage([16], stem_filters=8, pooling="max", name="b1"),
            kmt.layers.FeatureStage([32], pooling="max", name="b2"),
            kmt.layers.EmbeddingStage("avg"),
            kmt.layers.OutputStage(5),
        ]
    )


def run(out, tiny=False):
    """One backend's run (this process's); writes the files named above."""
    digits = kmt.data.load_digits_transfer(shots=20)
    pre_epochs, epochs = (2, 4) if tiny else (10, 30)
    model = backbone()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(*digits["source"], epochs=pre_epochs, batch_size=32, verbose=0)
    keras.utils.set_random_seed(1)
    model = kmt.optimize.quantize_model(kmt.attach(model, num_classes=5, groups=2))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    steps = epochs * int(np.ceil(len(digits["train"][1]) / 16))
    times = _StepTimes()
    callbacks = [
        kmt.callbacks.WarmupCosine(1e-2, warmup_steps=steps // 10, decay_steps=steps),
        kmt.callbacks.QuantizationSchedule(start_epoch=1),
        times,
    ]
    start = time.perf_counter()
    history = model.fit(
        *digits["train"], epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks
    )
    fit_seconds = time.perf_counter() - start
    x_test, y_test = digits["test"]
    np.save(os.path.join(out, "predictions.npy"), model.predict(x_test, verbose=0))
    model.save(os.path.join(out, "qat.keras"))
    start = time.perf_counter()
    result = kmt.convert(
        model, "cortex-m4", representative_data=digits["train"][0], verbose=0
    )
    convert_seconds = time.perf_counter() - start
    with open(os.path.join(out, "model.tflite"), "wb") as f:
        f.write(result.tflite)
    accuracy = kmt.evaluate(result, x_test, y_test, runtime="tflm")["accuracy"]
    later = [t for epoch in times.epochs[2:] for t in epoch]  # After compiling.
    figures = {
        "backend": keras.backend.backend(),
        "step_seconds": statistics.median(later or times.epochs[-1]),
        "fit_seconds": fit_seconds,
        "convert_seconds": convert_seconds,
        "tflm_accuracy": float(accuracy),
        "size_bytes": result.size_bytes,
        "arena_bytes": result.arena_bytes,
        "logs": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(figures, f, indent=1)
    return figures


def run_in(backend, out, tiny=False, timeout=900):
    """`run` in a child process on `backend`; returns its figures."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "benchmarks.backends", "--run", out]
    proc = subprocess.run(
        command + (["--tiny"] if tiny else []),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} run failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--run", metavar="OUT_DIR")
    args = parser.parse_args()
    if args.run:
        run(args.run, args.tiny)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("tensorflow", "jax"):
            out = os.path.join(tmp, backend)
            os.makedirs(out)
            rows[backend] = run_in(backend, out, args.tiny)
    base = rows["tensorflow"]["step_seconds"]
    print(
        "| backend | QAT step (ms) | step / TensorFlow's | fit (s) | convert (s) "
        "| int8 TFLite Micro accuracy | flatbuffer bytes |"
    )
    print("|---|---|---|---|---|---|---|")
    for backend, r in rows.items():
        print(
            f"| {backend} | {1000 * r['step_seconds']:.2f} | "
            f"{r['step_seconds'] / base:.2f} | {r['fit_seconds']:.1f} | "
            f"{r['convert_seconds']:.1f} | {r['tflm_accuracy']:.4f} | "
            f"{r['size_bytes']:,} |"
        )


if __name__ == "__main__":
    main()
