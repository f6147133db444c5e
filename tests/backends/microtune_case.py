"""The microtuning both multi-worker scripts run (`multiworker_script.py`
on TensorFlow's MultiWorkerMirroredStrategy, `jax_multiprocess_script.py`
on JAX's keras.distribution): the data, the models, the callbacks and what
each worker writes. Import it after the strategy or distribution is set up.
"""

import json
import os

import keras
import numpy as np

import keras_microtune as kmt

EPOCHS = 4
BATCH = 16  # Global batch: 8 per worker.


class Record(keras.callbacks.Callback):
    """Each epoch's logs (scheduled values included) as this worker sees them."""

    def on_train_begin(self, logs=None):
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})


def arrays():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
    return x, y


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


def qat_model():
    """An attached, QAT-wrapped, compiled model (build it in the strategy's
    scope). Attached: BatchNorm in inference mode. (A BatchNormalization that
    trains keeps each worker's own batch statistics unless it is
    `synchronized=True`: Keras' behaviour, not checked here.)"""
    model = kmt.optimize.quantize_model(kmt.attach(backbone(), num_classes=2))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    return model


def qat_callbacks(x):
    """WarmupCosine, QuantizationSchedule, DeviceBudget and a Record."""
    return [
        kmt.callbacks.WarmupCosine(1e-2, warmup_steps=2, decay_steps=16),
        kmt.callbacks.QuantizationSchedule(start_epoch=1, freeze_ranges_epoch=3),
        kmt.callbacks.DeviceBudget("cortex-m0plus", x[:16], every=2),
        Record(),
    ]


def pruned_model():
    """An attached model pruned to 50 % by step 6, compiled."""
    model = kmt.optimize.prune_low_magnitude(
        kmt.attach(backbone(), num_classes=2),
        target_sparsity=0.5,
        end_step=6,
        frequency=2,
    )
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    return model


def write(out, index, qat, qat_record, budget, pruned, prune_record, **extra):
    """`out/worker<index>.npz` (both models' weights, by path, so a mismatch
    names the variable) and `out/worker<index>.json` (the records)."""
    weights = {}
    for name, model in (("qat", qat), ("pruned", pruned)):
        for v in model.weights:
            weights[f"{name}:{v.path.replace('/', '.')}"] = np.asarray(v.value)
    np.savez(os.path.join(out, f"worker{index}.npz"), **weights)
    report = {
        "qat": qat_record.epochs,
        "pruning": prune_record.epochs,
        "converted": budget.result is not None,
        **extra,
    }
    with open(os.path.join(out, f"worker{index}.json"), "w") as f:
        json.dump(report, f)
