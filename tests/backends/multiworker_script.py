"""One worker of a two-worker MultiWorkerMirroredStrategy microtuning run.

Started twice by `test_multiworker.py`, with a loopback `TF_CONFIG` each:

    TF_CONFIG=... python tests/backends/multiworker_script.py OUT_DIR

Trains an attached, QAT-wrapped model with WarmupCosine,
QuantizationSchedule and DeviceBudget, then a pruned model with
PruningSchedule. Writes `OUT_DIR/worker<i>.json` (each epoch's learning
rate, QAT flags, pruning step, DeviceBudget figures, whether this worker
converted) and `OUT_DIR/worker<i>.npz` (the final weights of both models).

Keras 3.15's `model.fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585: its symbolic build reduces the whole `(x, y)`
batch with `strategy.reduce`, and its log reduction calls
`strategy.reduce(..., axis=0)` on scalars; both raise with two workers).
So `fit` below is the loop `model.fit` runs, written out: the model's own
`train_step` in `strategy.run`, the callbacks through Keras'
`CallbackList` with the same hooks in the same order.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()  # Before any op.

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_microtune as kmt  # noqa: E402

INDEX = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
EPOCHS = 4
BATCH = 16  # Global batch: 8 per worker.


class Record(keras.callbacks.Callback):
    """Each epoch's scheduled values as this worker sees them."""

    def on_train_begin(self, logs=None):
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})


def fit(model, dataset, epochs, callbacks):
    """`model.fit(dataset, epochs, callbacks)`'s loop (see the docstring)."""
    with STRATEGY.scope():
        model.optimizer.build(model.trainable_variables)
    callbacks = keras.callbacks.CallbackList(callbacks, model=model)
    distributed = STRATEGY.experimental_distribute_dataset(dataset)

    @tf.function
    def step(batch):
        logs = STRATEGY.run(model.train_step, args=(batch,))
        return STRATEGY.reduce("MEAN", logs["loss"], axis=None)

    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        for index, batch in enumerate(distributed):
            callbacks.on_train_batch_begin(index)
            loss = float(step(batch))
            callbacks.on_train_batch_end(index, {"loss": loss})
        logs = {"loss": loss}
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()


def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    options = tf.data.Options()
    policy = tf.data.experimental.AutoShardPolicy.DATA
    options.experimental_distribute.auto_shard_policy = policy
    return x, dataset.with_options(options)


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


def main(out):
    x, dataset = data()
    with STRATEGY.scope():
        qat = kmt.optimize.quantize_model(kmt.attach(backbone(), num_classes=2))
        qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", x[:16], every=2)
    record = Record()
    schedules = [
        kmt.callbacks.WarmupCosine(1e-2, warmup_steps=2, decay_steps=16),
        kmt.callbacks.QuantizationSchedule(start_epoch=1, freeze_ranges_epoch=3),
    ]
    fit(qat, dataset, EPOCHS, [*schedules, budget, record])
    with STRATEGY.scope():
        # Attached: BatchNorm in inference mode. (A BatchNormalization that
        # trains keeps each worker's own batch statistics unless it is
        # `synchronized=True`: Keras' behaviour, not checked here.)
        pruned = kmt.optimize.prune_low_magnitude(
            kmt.attach(backbone(), num_classes=2),
            target_sparsity=0.5,
            end_step=6,
            frequency=2,
        )
        pruned.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    prune_record = Record()
    fit(pruned, dataset, 2, [kmt.callbacks.PruningSchedule(), prune_record])
    weights = {}
    for name, model in (("qat", qat), ("pruned", pruned)):
        for v in model.weights:  # By path, so a mismatch names the variable.
            weights[f"{name}:{v.path.replace('/', '.')}"] = np.asarray(v.numpy())
    np.savez(os.path.join(out, f"worker{INDEX}.npz"), **weights)
    report = {
        "qat": record.epochs,
        "pruning": prune_record.epochs,
        "converted": budget.result is not None,
        "is_chief": bool(STRATEGY.extended.should_checkpoint),
    }
    with open(os.path.join(out, f"worker{INDEX}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
