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

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402

OUT, PORT, INDEX = sys.argv[1], sys.argv[2], int(sys.argv[3])
keras.distribution.initialize(f"127.0.0.1:{PORT}", 2, INDEX)  # Before any op.
keras.distribution.set_distribution(keras.distribution.DataParallel())

import tensorflow as tf  # noqa: E402
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


def main():
    x, y = arrays()
    # A tf.data.Dataset: Keras shards it over the processes (global batch).
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    qat = qat_model()
    callbacks = qat_callbacks(x)
    qat.fit(dataset, epochs=EPOCHS, callbacks=callbacks, verbose=0)
    pruned = pruned_model()
    prune_record = Record()
    callbacks_pruned = [kmt.callbacks.PruningSchedule(), prune_record]
    pruned.fit(dataset, epochs=2, callbacks=callbacks_pruned, verbose=0)
    budget, record = callbacks[2], callbacks[3]
    write(OUT, INDEX, qat, record, budget, pruned, prune_record)


if __name__ == "__main__":
    main()
