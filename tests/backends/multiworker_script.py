"""One worker of a two-worker MultiWorkerMirroredStrategy microtuning run.

Started twice by `test_multiworker.py`, with a loopback `TF_CONFIG` each:

    TF_CONFIG=... python tests/backends/multiworker_script.py OUT_DIR BACKUP_DIR \
        [--kill-at EPOCH,BATCH]

Trains an attached, QAT-wrapped model with WarmupCosine,
QuantizationSchedule and DeviceBudget, backed up after every epoch into
`BACKUP_DIR/worker<i>`, then a pruned model with PruningSchedule. Writes
`OUT_DIR/worker<i>.json` (each epoch's learning rate, QAT flags, pruning
step, DeviceBudget figures, whether this worker converted) and
`OUT_DIR/worker<i>.npz` (the final weights of both models). With
`--kill-at`, the worker sends itself SIGKILL before that batch of the QAT
training (a machine lost mid-training); started again without it, it
resumes from its last backup.

Keras 3.15's `model.fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585: its symbolic build reduces the whole `(x, y)`
batch with `strategy.reduce`, and its log reduction calls
`strategy.reduce(..., axis=0)` on scalars; both raise with two workers).
So `fit` below is the loop `model.fit` runs, written out: the model's own
`train_step` in `strategy.run`, the callbacks through Keras'
`CallbackList` with the same parameters (`epochs`, `steps`) and the same
hooks in the same order.

The backup is a `tf.train.CheckpointManager` over the model, its
optimizer and the epoch, not Keras' BackupAndRestore: that one saves with
`save_weights`, which merges each LoRA update into its kernel, and loads
it back with `lora_kernel_a` and `lora_kernel_b` at zero (Keras' design for
LoRA, keras-team/keras#23244). The outputs survive, but at zero both
factors get zero gradients and move only by the optimizer's restored
momentum: resumed that way, this run ended with `lora_kernel_a` near 0.01
where the uninterrupted run has about 0.5 (weights up to 1.2 apart).
`PrefixCacheModel` now saves and restores the factors itself; this run
keeps the checkpoint route, which is what the issue measured. A checkpoint keeps
every variable as it is, and the resumed run ends bit-identical to an
uninterrupted one. Each worker writes its own
directory: every worker must take part in the save, and the weights are
the same on all of them.
"""

import argparse
import json
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()  # Before any op.

import keras  # noqa: E402
from microtune_case import (  # noqa: E402
    BATCH,
    EPOCHS,
    Record,
    arrays,
    pruned_model,
    qat_callbacks,
    qat_model,
    write,
)

import keras_microtune as kmt  # noqa: E402

INDEX = json.loads(os.environ["TF_CONFIG"])["task"]["index"]


class KillAt(keras.callbacks.Callback):
    """SIGKILL this worker before batch `batch` of epoch `epoch`."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._epoch, batch) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


def fit(model, dataset, epochs, callbacks, backup_dir):
    """`model.fit(dataset, epochs, callbacks)`'s loop (see the docstring),
    resuming from and backing up to `backup_dir`."""
    with STRATEGY.scope():
        model.optimizer.build(model.trainable_variables)
    epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=model.optimizer, epoch=epochs_done
    )
    backup = tf.train.CheckpointManager(checkpoint, backup_dir, max_to_keep=1)
    checkpoint.restore(backup.latest_checkpoint)  # None: nothing to restore.
    steps = int(dataset.cardinality())
    callbacks = keras.callbacks.CallbackList(
        callbacks, model=model, epochs=epochs, steps=steps, verbose=0
    )
    distributed = STRATEGY.experimental_distribute_dataset(dataset)

    @tf.function
    def step(batch):
        logs = STRATEGY.run(model.train_step, args=(batch,))
        return STRATEGY.reduce("MEAN", logs["loss"], axis=None)

    callbacks.on_train_begin()
    for epoch in range(int(epochs_done.numpy()), epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        for index, batch in enumerate(distributed):
            callbacks.on_train_batch_begin(index)
            loss = float(step(batch))
            callbacks.on_train_batch_end(index, {"loss": loss})
        logs = {"loss": loss}
        callbacks.on_epoch_end(epoch, logs)
        epochs_done.assign(epoch + 1)
        backup.save()
    callbacks.on_train_end()


def data():
    x, y = arrays()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    options = tf.data.Options()
    policy = tf.data.experimental.AutoShardPolicy.DATA
    options.experimental_distribute.auto_shard_policy = policy
    return x, dataset.with_options(options)


def main(out, backup, kill_at=None):
    x, dataset = data()
    with STRATEGY.scope():
        qat = qat_model()
    callbacks = qat_callbacks(x)
    if kill_at is not None:
        callbacks.append(KillAt(*kill_at))
    fit(qat, dataset, EPOCHS, callbacks, os.path.join(backup, f"worker{INDEX}"))
    with STRATEGY.scope():
        pruned = pruned_model()
    prune_record = Record()
    prune_backup = os.path.join(backup, f"pruned{INDEX}")
    callbacks_pruned = [kmt.callbacks.PruningSchedule(), prune_record]
    fit(pruned, dataset, 2, callbacks_pruned, prune_backup)
    budget, record = callbacks[2], callbacks[3]
    is_chief = bool(STRATEGY.extended.should_checkpoint)
    write(out, INDEX, qat, record, budget, pruned, prune_record, is_chief=is_chief)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("backup")
    parser.add_argument("--kill-at", type=lambda s: tuple(map(int, s.split(","))))
    args = parser.parse_args()
    main(args.out, args.backup, args.kill_at)
