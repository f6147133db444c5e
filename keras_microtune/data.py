"""Representative and validation data adapters.

`as_arrays` turns what users pass to `kmt.convert` (a numpy array, an `(x, y)`
tuple, a `tf.data.Dataset`, a generator, or a path to an `.npz`/`.npy` file) into
float32 numpy arrays, and rejects data that would silently give a bad model:
empty data, the wrong shape or dtype, NaN or Inf. Errors name the offending
sample.
"""

from __future__ import annotations

import os

import numpy as np

_NPZ_X_KEYS = ("x", "x_calib", "x_val", "x_test", "inputs")
_NPZ_Y_KEYS = ("y", "y_val", "y_test", "labels")


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Load `(x, y)` from an `.npz` (keys `x`/`y`, or a single array) or `.npy`.

    Files are read with `allow_pickle=False`: object arrays are refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such data file: {path!r}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(
                f"{path!r} contains pickled (object) arrays, which keras_microtune "
                "refuses to load because unpickling can run code. Save plain "
                "numeric arrays with np.savez(path, x=x, y=y)."
            ) from None
        raise ValueError(f"{path!r} is not a readable .npz/.npy file: {e}") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path!r} is not a readable .npz/.npy file: {e}") from None
    x_key = next((k for k in _NPZ_X_KEYS if k in arrays), None)
    if x_key is None:
        if len(arrays) != 1:
            raise ValueError(
                f"{path!r} holds arrays {sorted(arrays)}; expected one array or "
                f"an array named one of {_NPZ_X_KEYS}."
            )
        x_key = next(iter(arrays))
    y_key = next((k for k in _NPZ_Y_KEYS if k in arrays), None)
    return arrays[x_key], (arrays[y_key] if y_key else None)


def _from_items(items, n_inputs, what):
    """Collect samples or batches yielded by a generator or a Dataset."""
    xs, ys = [], []
    for item in items:
        if hasattr(item, "numpy") or isinstance(item, np.ndarray):
            item = (item,)
        elif isinstance(item, dict):
            raise TypeError(f"`{what}` yielded a dict; yield arrays or (x, y).")
        item = [np.asarray(v) for v in item]
        if n_inputs == 1 and len(item) in (1, 2, 3):
            x, y = [item[0]], item[1] if len(item) > 1 else None
        elif len(item) == n_inputs:
            x, y = item, None
        else:
            raise ValueError(
                f"`{what}` yielded {len(item)} arrays; the model has {n_inputs} "
                "input(s). Yield x, (x, y) or a list with one array per input."
            )
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"`{what}` is empty: it yielded no samples.")
    return xs, ys


def as_arrays(
    data, input_shapes: list[tuple], what: str = "representative_data"
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Convert `data` to `([x per input], y or None)`, each x float32 `(N, ...)`.

    Args:
        data: numpy array; `(x, y)` tuple; `tf.data.Dataset` (batched or not);
            generator or iterable of x or `(x, y)`; path to an `.npz`/`.npy` file.
        input_shapes: list of tuple. Per model input, the shape without the
            batch axis (None for any size).
        what: str. The argument name used in error messages.

    Raises:
        ValueError: empty data, wrong shape, NaN/Inf (naming the sample).
        TypeError: an unsupported type or a non-numeric dtype.
    """
    n_inputs = len(input_shapes)
    y = None
    if isinstance(data, (str, os.PathLike)):
        x, y = load_npz(data)
        xs = [x]
    elif isinstance(data, np.ndarray) or hasattr(data, "__array__"):
        xs = [np.asarray(data)]
    elif isinstance(data, tuple) and n_inputs == 1 and len(data) in (1, 2, 3):
        xs, y = [np.asarray(data[0])], data[1] if len(data) > 1 else None
    elif (
        isinstance(data, (list, tuple))
        and len(data) == n_inputs
        and all(isinstance(a, np.ndarray) for a in data)
    ):
        xs = [np.asarray(a) for a in data]
    elif hasattr(data, "__iter__") or callable(data):
        items = data() if callable(data) and not hasattr(data, "__iter__") else data
        if hasattr(items, "as_numpy_iterator"):
            items = items.as_numpy_iterator()
        samples, labels = _from_items(items, n_inputs, what)
        xs = []
        for i, shape in enumerate(input_shapes):
            parts = [np.asarray(s[i]) for s in samples]
            batched = parts[0].ndim == len(shape) + 1
            xs.append(np.concatenate(parts) if batched else np.stack(parts))
        if all(lab is not None for lab in labels):
            y = np.concatenate([np.atleast_1d(lab) for lab in labels])
    else:
        raise TypeError(
            f"Received an invalid value for `{what}`, expected a numpy array, an "
            "(x, y) tuple, a tf.data.Dataset, a generator or a .npz path. "
            f"Received: {type(data).__name__}"
        )
    xs = [
        _check(x, shape, what, i) for i, (x, shape) in enumerate(zip(xs, input_shapes))
    ]
    if len(xs) != n_inputs:
        raise ValueError(f"`{what}` has {len(xs)} input arrays; expected {n_inputs}.")
    if len({len(x) for x in xs}) != 1:
        raise ValueError(f"`{what}`: input arrays have different sample counts.")
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(xs[0]):
            raise ValueError(f"`{what}` has {len(xs[0])} inputs but {len(y)} labels.")
    return xs, y


def _check(x, shape, what, index):
    name = what if index == 0 else f"{what} input {index}"
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.floating)
        or np.issubdtype(x.dtype, np.integer)
        or x.dtype == bool
    ):
        raise TypeError(
            f"`{name}` has dtype {x.dtype}; expected a numeric (float or integer) "
            "array."
        )
    if x.ndim == len(shape):  # A single sample without its batch axis.
        x = x[None]
    if x.ndim != len(shape) + 1:
        raise ValueError(
            f"`{name}` has shape {x.shape}; the model expects (N, "
            f"{', '.join(str(d) for d in shape)})."
        )
    if len(x) == 0:
        raise ValueError(f"`{name}` is empty: it holds 0 samples.")
    for axis, (got, want) in enumerate(zip(x.shape[1:], shape)):
        if want is not None and got != want:
            raise ValueError(
                f"`{name}` has shape {x.shape}; the model expects (N, "
                f"{', '.join(str(d) for d in shape)}): axis {axis + 1} is {got}, "
                f"expected {want}."
            )
    x = x.astype("float32")
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        kind = "NaN" if np.isnan(x[bad]).any() else "Inf"
        raise ValueError(
            f"`{name}` contains {kind} in sample {bad} "
            f"({int((~finite).sum())} of {len(x)} samples are not finite). "
            "Remove or fix them before converting."
        )
    return x


# --- Bundled real datasets (shipped inside installed packages; no download) ---


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
