"""One of two JAX processes microtuning with Keras' own `model.fit` under
`keras.distribution.DataParallel` across processes.

Started twice by `test_multiworker.py`:

    python tests/backends/jax_multiprocess_script.py OUT_DIR COORDINATOR_PORT INDEX

Keras' `model.fit` does not run under TensorFlow's MultiWorkerMirroredStrategy
(see `multiworker_script.py`); on the JAX backend, `keras.distribution`
spreads one `fit` over several processes (here on CPU, with gloo
collectives). Trains the same attached, QAT-wrapped model with
WarmupCosine, QuantizationSchedule and DeviceBudget, then a pruned model
with PruningSchedule, and writes `OUT_DIR/worker<i>.json` (each epoch's
logs, whether this process converted) and `OUT_DIR/worker<i>.npz` (the
final weights).
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT, PORT, INDEX = sys.argv[1], sys.argv[2], int(sys.argv[3])
keras.distribution.initialize(f"127.0.0.1:{PORT}", 2, INDEX)  # Before any op.
keras.distribution.set_distribution(keras.distribution.DataParallel())

import tensorflow as tf  # noqa: E402

import keras_microtune as kmt  # noqa: E402


class Record(keras.callbacks.Callback):
    """Each epoch's logs as this process sees them."""

    def on_train_begin(self, logs=None):
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})


def backbone():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            kmt.layers.FeatureStage([8], stem_filters=4, pooling="max", name="b1"),
            kmt.layers.EmbeddingStage("avg"),
            kmt.layers.OutputStage(2),
        ]
    )


def main():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
    # A tf.data.Dataset: Keras shards it over the processes (global batch 16).
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    qat = kmt.optimize.quantize_model(kmt.attach(backbone(), num_classes=2))
    qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:16], every=2)
    record = Record()
    callbacks = [
        kmt.callbacks.WarmupCosine(1e-2, warmup_steps=2, decay_steps=16),
        kmt.callbacks.QuantizationSchedule(start_epoch=1, freeze_ranges_epoch=3),
        budget,
        record,
    ]
    qat.fit(dataset, epochs=4, callbacks=callbacks, verbose=0)
    pruned = kmt.optimize.prune_low_magnitude(
        kmt.attach(backbone(), num_classes=2),
        target_sparsity=0.5,
        end_step=6,
        frequency=2,
    )
    pruned.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    prune_record = Record()
    callbacks = [kmt.callbacks.PruningSchedule(), prune_record]
    pruned.fit(dataset, epochs=2, callbacks=callbacks, verbose=0)
    weights = {}
    for name, model in (("qat", qat), ("pruned", pruned)):
        for v in model.weights:
            weights[f"{name}:{v.path.replace('/', '.')}"] = np.asarray(v.value)
    np.savez(os.path.join(OUT, f"worker{INDEX}.npz"), **weights)
    report = {
        "qat": record.epochs,
        "pruning": prune_record.epochs,
        "converted": budget.result is not None,
    }
    with open(os.path.join(OUT, f"worker{INDEX}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
