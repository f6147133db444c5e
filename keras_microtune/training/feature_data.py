"""Compute prefix features once and feed them to Keras' `fit` without overhead.

Keras builds a fresh `tf.data` iterator over array inputs at every epoch (two,
in fact); on a small cached dataset that costs more than the training steps.
`training_dataset` therefore batches the features once, in the same order as
Keras (`shuffle=False`), shuffles each epoch like Keras (`shuffle=True`: all
samples, `"batch"`: batch order) with TensorFlow's seeded shuffle, and repeats,
so one iterator serves the whole `fit` with `steps_per_epoch` batches.
"""

import math

import keras
import numpy as np

# Up to this many batches the prefix runs eagerly (no tracing); beyond, predict.
EAGER_BATCHES = 64


def _rows(x):
    return int(keras.tree.flatten(x)[0].shape[0])


def prefix_features(prefix, x, batch_size):
    """`prefix` over `x` in batches of `batch_size`, in inference mode."""
    n = _rows(x)
    if math.ceil(n / batch_size) > EAGER_BATCHES:
        return prefix.predict(x, batch_size=batch_size, verbose=0)
    x = keras.tree.map_structure(np.asarray, x)
    chunks = []
    for start in range(0, n, batch_size):
        stop = start + batch_size
        batch = keras.tree.map_structure(lambda a, i=start, j=stop: a[i:j], x)
        out = prefix(batch, training=False)
        chunks.append([keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(out)])
    features = [np.concatenate(parts) for parts in zip(*chunks)]
    return features[0] if len(features) == 1 else features


def split_validation(arrays, validation_split):
    """Keras' split: the last `validation_split` of the samples validate."""
    n = _rows([a for a in arrays if a is not None])
    split_at = int(math.floor(n * (1.0 - validation_split)))

    def part(lo, hi):
        return tuple(
            None if a is None else keras.tree.map_structure(lambda v: v[lo:hi], a)
            for a in arrays
        )

    return part(0, split_at), part(split_at, n)


def _elements(x, y, sample_weight):
    return tuple(a for a in (x, y, sample_weight) if a is not None)


def training_dataset(x, y, sample_weight, batch_size, shuffle):
    """(repeating dataset of (x, y[, sample_weight]) batches, steps per epoch)."""
    import tensorflow as tf

    n = _rows(x)
    dataset = tf.data.Dataset.from_tensor_slices(_elements(x, y, sample_weight))
    if shuffle is True:
        dataset = dataset.shuffle(n, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if shuffle == "batch":
        dataset = dataset.shuffle(math.ceil(n / batch_size))
    dataset = dataset.repeat().prefetch(tf.data.AUTOTUNE)
    return dataset, math.ceil(n / batch_size)


def evaluation_dataset(x, y, sample_weight, batch_size):
    """Dataset of (x, y[, sample_weight]) batches for validation, in order."""
    import tensorflow as tf

    elements = _elements(x, y, sample_weight)
    return tf.data.Dataset.from_tensor_slices(elements).batch(batch_size)
