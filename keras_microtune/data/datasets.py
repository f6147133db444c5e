"""Bundled real datasets, shipped inside installed packages (no download)."""

import numpy as np


def load_digits_transfer(shots=None, seed=0):
    """scikit-learn's 8x8 handwritten digits as a transfer task.

    The source task is digits 0-4, the target task digits 5-9 relabelled 0-4.
    Pixels are scaled to [0, 1] and shaped `(n, 8, 8, 1)`.

    Args:
        shots: int or None. Labelled target samples per class for training;
            the remaining target samples form the test split. None keeps a
            75/25 split. Defaults to `None`.
        seed: int. Seed of the split. Defaults to `0`.

    Returns:
        dict with `source` `(x, y)` and target `train`, `test` `(x, y)`.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    rng = np.random.default_rng(seed)
    source = y < 5
    xt, yt = x[~source], y[~source] - 5
    order = rng.permutation(len(yt))
    xt, yt = xt[order], yt[order]
    if shots is None:
        cut = int(0.75 * len(yt))
        train = np.arange(cut)
    else:
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(
                "Received an invalid value for `shots`, expected None or a positive "
                f"integer. Received: shots={shots!r}"
            )
        train = np.concatenate([np.flatnonzero(yt == c)[:shots] for c in range(5)])
    test = np.setdiff1d(np.arange(len(yt)), train)
    return {
        "source": (x[source], y[source]),
        "train": (xt[train], yt[train]),
        "test": (xt[test], yt[test]),
    }


def load_basic_motions():
    """aeon's bundled BasicMotions: 6-axis accelerometer + gyroscope, 4 activities.

    Returns:
        dict with `train`, `test` `(x, y)` where x is `(n, 100, 6)` float32
        (time-major, per-channel standardised with the training statistics)
        and y integer labels; `classes` lists the activity names.
    """
    from aeon.datasets import load_basic_motions as _load

    x_train, y_train = _load(split="train")
    x_test, y_test = _load(split="test")
    classes = sorted(str(c) for c in set(y_train))
    x_train = np.transpose(x_train, (0, 2, 1)).astype("float32")
    x_test = np.transpose(x_test, (0, 2, 1)).astype("float32")
    mean = x_train.mean(axis=(0, 1))
    std = x_train.std(axis=(0, 1)) + 1e-6
    label = {name: i for i, name in enumerate(classes)}
    return {
        "train": ((x_train - mean) / std, np.array([label[v] for v in y_train])),
        "test": ((x_test - mean) / std, np.array([label[v] for v in y_test])),
        "classes": classes,
    }
