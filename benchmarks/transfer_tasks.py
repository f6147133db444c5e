"""The five transfer tasks of table 2: bundled data, backbones, pretraining.

Every task is a source set the backbone is pretrained on and a small target
set it is adapted to (train, a validation split of it for choosing full
fine-tuning's learning rate, and a held-out test set). Nothing is downloaded:
scikit-learn's digits and aeon's bundled UCR/UEA sets.
"""

import numpy as np

TASKS = ("digits", "mobilenet", "basicmotions", "osuleaf-arrowhead", "vowels")
DESCRIPTIONS = {
    "digits": "digits 0-4 -> 5-9, 20 shots, demo backbone (8x8)",
    "mobilenet": "MobileNetV2(alpha=0.35) on digits at 32x32, 0-4 -> 5-9, 20 shots",
    "basicmotions": "BasicMotions accelerometer -> gyroscope (4 activities, 40 train)",
    "osuleaf-arrowhead": (
        "UCR OSULeaf (6 leaf outlines) -> ArrowHead (3 classes, 36 train)"
    ),
    "vowels": "UEA JapaneseVowels speakers 1-5 -> 6-9, 10 shots",
}


def _resample(series, length):
    """(channels, steps) -> (length, channels) by linear interpolation."""
    series = np.asarray(series, "float64")
    old = np.linspace(0.0, 1.0, series.shape[-1])
    new = np.linspace(0.0, 1.0, length)
    return np.stack([np.interp(new, old, s) for s in series], axis=-1)


def _ucr(name, split, length):
    from aeon.datasets import load_classification

    x, y = load_classification(name, split=split)
    x = np.stack([_resample(s, length) for s in x]).astype("float32")
    classes = sorted(set(y))
    return x, np.array([classes.index(v) for v in y], "int32")


def _shots(y, shots, seed=0):
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def _standardise(reference, *arrays):
    mean = reference.mean(axis=tuple(range(reference.ndim - 1)))
    std = reference.std(axis=tuple(range(reference.ndim - 1))) + 1e-6
    return [((a - mean) / std).astype("float32") for a in arrays]


def _digits(size=None):
    import keras_microtune as kmt

    d = kmt.data.load_digits_transfer(shots=20)
    if size is None:
        return d
    import tensorflow as tf

    def up(x):
        return tf.image.resize(x, (size, size)).numpy().astype("float32")

    return {k: (up(x), y) for k, (x, y) in d.items()}


def load(name):
    """dict with `source`, `train`, `test` `(x, y)` and `classes` of the target."""
    if name == "digits":
        d = _digits()
    elif name == "mobilenet":
        d = _digits(32)
    elif name == "basicmotions":
        import keras_microtune as kmt

        b = kmt.data.load_basic_motions()
        (xa, ya), (xb, yb) = b["train"], b["test"]
        d = {
            "source": (xa[..., :3], ya),
            "train": (xa[..., 3:], ya),
            "test": (xb[..., 3:], yb),
        }
    elif name == "osuleaf-arrowhead":
        xs = [_ucr("OSULeaf", s, 128) for s in ("train", "test")]
        source = (
            np.concatenate([x for x, _ in xs]),
            np.concatenate([y for _, y in xs]),
        )
        d = {
            "source": source,
            "train": _ucr("ArrowHead", "train", 128),
            "test": _ucr("ArrowHead", "test", 128),
        }
    elif name == "vowels":
        xa, ya = _ucr("JapaneseVowels", "train", 32)
        xb, yb = _ucr("JapaneseVowels", "test", 32)
        xa, xb = _standardise(xa[ya < 5], xa, xb)
        target = np.flatnonzero(ya >= 5)
        keep = target[_shots(ya[target], 10)]
        d = {
            "source": (xa[ya < 5], ya[ya < 5]),
            "train": (xa[keep], ya[keep] - 5),
            "test": (xb[yb >= 5], yb[yb >= 5] - 5),
        }
    else:
        raise ValueError(f"Unknown task {name!r}; expected one of {TASKS}.")
    d["classes"] = int(d["train"][1].max()) + 1
    return d


def validation_split(x, y, fraction=0.25, seed=0):
    """A stratified (fit, val) split of the target train set."""
    rng = np.random.default_rng(seed)
    val = np.concatenate(
        [
            rng.permutation(idx)[: max(1, int(round(fraction * len(idx))))]
            for idx in (np.flatnonzero(y == c) for c in np.unique(y))
        ]
    )
    fit = np.setdiff1d(np.arange(len(y)), val)
    return (x[fit], y[fit]), (x[val], y[val])


def _series_backbone(shape, classes):
    import keras

    from keras_microtune import layers

    return keras.Sequential(
        [
            keras.Input(shape),
            layers.FeatureStage([16], stem_filters=16, pooling="max", name="block1"),
            layers.FeatureStage([32, 32], pooling="max", name="block2"),
            layers.FeatureStage([32], pooling="max", name="block3"),
            layers.EmbeddingStage("avg", units=32, activation="relu"),
            layers.OutputStage(classes),
        ],
        name="series_backbone",
    )


def backbone(name, source):
    """An untrained backbone for task `name`, classifying `source`'s classes."""
    import keras

    x, y = source
    classes = int(y.max()) + 1
    if name == "digits":
        from keras_microtune.demo import build_backbone

        return build_backbone(classes)
    if name == "mobilenet":
        return keras.applications.MobileNetV2(
            input_shape=x.shape[1:], alpha=0.35, weights=None, classes=classes
        )
    return _series_backbone(x.shape[1:], classes)


PRETRAIN_EPOCHS = {
    "digits": 20,
    "mobilenet": 12,
    "basicmotions": 60,
    "osuleaf-arrowhead": 40,
    "vowels": 40,
}
# Small source sets train longer, in batches of 8.
MIN_PRETRAIN_STEPS = 350
# After training, every backbone's BatchNorm statistics are set from the whole
# source set (one training-mode pass, momentum 0): the moving averages do not
# match the weights they end with. Measured in inference mode before this:
# MobileNetV2 (keras.applications, momentum 0.999: 70% of the initial (0, 1)
# left after 350 steps) 0.20, chance, with logits TFLite Micro's int8 SOFTMAX
# refuses; the series backbones (momentum 0.99, batches of 8) 0.25 on
# BasicMotions (chance) and 0.40 on OSULeaf, though 1.00 in training mode.


def pretrain(name, data, tiny=False, seed=0):
    """The backbone trained on the source task, and its float accuracy on it.

    The accuracy is measured in inference mode (`model.evaluate`, BatchNorm
    on its moving statistics), as the transferred model runs.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = backbone(name, data["source"])
    model.compile(
        keras.optimizers.Adam(3e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x, y = data["source"]
    batch = 32 if len(y) >= 320 else 8
    steps = -(-len(y) // batch)
    epochs = max(PRETRAIN_EPOCHS[name], -(-MIN_PRETRAIN_STEPS // steps))
    model.fit(x, y, epochs=1 if tiny else epochs, batch_size=batch, verbose=0)
    from benchmarks.zoo import set_batchnorm_statistics

    set_batchnorm_statistics(model, x)
    return model, model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]
