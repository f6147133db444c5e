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
    elif isinstance(data, dict):
        raise TypeError(
            f"Received an invalid value for `{what}`, expected a numpy array, an "
            "(x, y) tuple or a list with one array per model input (in input "
            f"order). Received: dict with keys {sorted(map(str, data))}"
        )
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
    problem = _first_nonfinite(x)
    if problem is not None:
        kind, sample, channel, n_bad = problem
        raise ValueError(
            f"`{name}` contains {kind} in sample {sample}, channel {channel} "
            f"({n_bad} of {len(x)} samples are not finite). Inspect them with "
            "kmt.data.inspect(x) and fix them with kmt.data.clean(x, nan=...) "
            "before converting."
        )
    return x


def _nonfinite_samples(x: np.ndarray) -> np.ndarray:
    """Boolean per sample: holds a NaN or an Inf."""
    return ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def _first_nonfinite(x: np.ndarray):
    """`(kind, sample, channel, samples affected)` of the first NaN/Inf, or None.

    Channels are the last axis (Keras' channels-last layout).
    """
    bad = _nonfinite_samples(x)
    if not bad.any():
        return None
    sample = int(np.argmax(bad))
    where = ~np.isfinite(x[sample])
    index = np.unravel_index(int(np.argmax(where)), where.shape)
    value = x[sample][index]
    channel = int(index[-1]) if index else 0
    return ("NaN" if np.isnan(value) else "Inf", sample, channel, int(bad.sum()))
