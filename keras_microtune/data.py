"""Representative and validation data adapters.

`as_arrays` turns what users pass to `kmt.convert` (a numpy array, an `(x, y)`
tuple, a `tf.data.Dataset`, a generator, or a path to an `.npz`/`.npy` file) into
float32 numpy arrays, and rejects data that would silently give a bad model:
empty data, the wrong shape or dtype, NaN or Inf. Errors name the offending
sample.
"""

from __future__ import annotations

import dataclasses
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


# --- Inspection and cleaning (the same checks `as_arrays` applies) ---

NAN_FIXES = ("drop", "zero", "mean", "raise")
INF_FIXES = ("drop", "zero", "mean", "clip", "raise")


@dataclasses.dataclass
class DataReport:
    """What `inspect` found; channels are the last axis.

    Attributes:
        shape: tuple. Shape of the data.
        nan, inf: int. Number of NaN / Inf values.
        nonfinite_samples: list of int. Samples holding a NaN or Inf.
        nan_channels, inf_channels: list of int. Channels holding them.
        constant_channels: list of int. Channels with a single value (zero
            standard deviation over the finite values).
        outliers: list of int. Per channel, values beyond `sigma` standard
            deviations from the channel mean.
        outlier_samples: list of int. Samples holding an outlier.
        mean, std, min, max: list of float. Per channel, finite values only.
        sigma: float. The outlier threshold used.
    """

    shape: tuple
    nan: int
    inf: int
    nonfinite_samples: list
    nan_channels: list
    inf_channels: list
    constant_channels: list
    outliers: list
    outlier_samples: list
    mean: list
    std: list
    min: list
    max: list
    sigma: float

    @property
    def ok(self) -> bool:
        """No NaN, no Inf, no constant channel, no outlier."""
        return not (
            self.nan or self.inf or self.constant_channels or self.outlier_samples
        )

    def __str__(self) -> str:
        n = self.shape[0] if self.shape else 0
        lines = [
            f"{n} samples of shape {tuple(self.shape[1:])}, {len(self.mean)} "
            "channel(s) (last axis)"
        ]
        if self.nan or self.inf:
            lines.append(
                f"NaN: {self.nan} value(s) in channel(s) {self.nan_channels}; "
                f"Inf: {self.inf} value(s) in channel(s) {self.inf_channels}; "
                f"samples {_few(self.nonfinite_samples)}"
            )
        if self.constant_channels:
            lines.append(f"constant channel(s): {self.constant_channels}")
        if self.outlier_samples:
            lines.append(
                f"outliers beyond {self.sigma:g} sigma: {sum(self.outliers)} value(s) "
                f"in {len(self.outlier_samples)} sample(s) "
                f"{_few(self.outlier_samples)}"
            )
        if self.ok:
            lines.append("no NaN, Inf, constant channel or outlier")
        lines.append("channel      mean       std       min       max  outliers")
        for c in range(len(self.mean)):
            lines.append(
                f"{c:>7} {self.mean[c]:>9.4g} {self.std[c]:>9.4g} "
                f"{self.min[c]:>9.4g} {self.max[c]:>9.4g} {self.outliers[c]:>9}"
            )
        return "\n".join(lines)


def _few(indices, limit=10):
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


def _as_array(x, what="x") -> np.ndarray:
    if isinstance(x, (str, os.PathLike)):
        x = load_npz(x)[0]
    elif isinstance(x, tuple) and len(x) in (2, 3):
        x = x[0]
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(f"`{what}` has dtype {x.dtype}; expected a numeric array.")
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"`{what}` is empty or a scalar: shape {x.shape}.")
    return x.astype("float64")


def _channel_stats(x):
    """Per-channel (count, mean, std, min, max) over finite values."""
    flat = x.reshape(-1, x.shape[-1] if x.ndim > 1 else 1)
    finite = np.isfinite(flat)
    count = finite.sum(axis=0)
    safe = np.where(finite, flat, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = safe.sum(axis=0) / count
        var = (np.where(finite, flat - mean, 0.0) ** 2).sum(axis=0) / count
    low = np.where(finite, flat, np.inf).min(axis=0)
    high = np.where(finite, flat, -np.inf).max(axis=0)
    return count, np.nan_to_num(mean), np.sqrt(np.nan_to_num(var)), low, high


def inspect(x, sigma: float = 4.0) -> DataReport:
    """Check data before training or calibration.

    Reports NaN and Inf (which samples, which channels), constant channels,
    outliers beyond `sigma` standard deviations, and per-channel statistics.
    Channels are the last axis.

    Args:
        x: numpy array, `(x, y)` tuple or `.npz`/`.npy` path, `(N, ...)`.
        sigma: float. Outlier threshold in standard deviations. Defaults to `4`.

    Returns:
        A `DataReport`; `print(report)` shows a table, `report.ok` is True
        when nothing was found.

    Example:

    >>> import numpy as np, keras_microtune as kmt
    >>> x = np.ones((4, 3)); x[1, 2] = np.nan
    >>> kmt.data.inspect(x).nan_channels
    [2]
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
        raise ValueError(
            "Received an invalid value for `sigma`, expected a positive number. "
            f"Received: sigma={sigma!r}"
        )
    x = _as_array(x)
    per_sample = x.reshape(len(x), -1)
    channels = x.shape[-1] if x.ndim > 1 else 1
    by_channel = x.reshape(-1, channels)
    _, mean, std, low, high = _channel_stats(x)
    nan, inf = np.isnan(by_channel), np.isinf(by_channel)
    with np.errstate(invalid="ignore"):
        far = np.abs(by_channel - mean) > sigma * std
    far &= np.isfinite(by_channel) & (std > 0)
    samples_far = far.reshape(len(x), -1).any(axis=1)
    bad = ~np.isfinite(per_sample).all(axis=1)
    spread = np.where(np.isfinite(high - low), high - low, 0.0)
    return DataReport(
        shape=tuple(x.shape),
        nan=int(nan.sum()),
        inf=int(inf.sum()),
        nonfinite_samples=np.flatnonzero(bad).tolist(),
        nan_channels=np.flatnonzero(nan.any(axis=0)).tolist(),
        inf_channels=np.flatnonzero(inf.any(axis=0)).tolist(),
        constant_channels=np.flatnonzero(spread == 0).tolist(),
        outliers=far.sum(axis=0).astype(int).tolist(),
        outlier_samples=np.flatnonzero(samples_far).tolist(),
        mean=mean.tolist(),
        std=std.tolist(),
        min=np.where(np.isfinite(low), low, np.nan).tolist(),
        max=np.where(np.isfinite(high), high, np.nan).tolist(),
        sigma=float(sigma),
    )


def clean(x, y=None, nan: str = "drop", inf: str | None = None, clip_sigma=None):
    """Apply the chosen fixes for what `inspect` reports; return a float32 copy.

    Args:
        x: numpy array `(N, ...)`; channels are the last axis.
        y: labels or None. Dropped samples are dropped from `y` too.
        nan: str. `"drop"` the samples, replace by `"zero"` or by the channel
            `"mean"`, or `"raise"` a ValueError naming sample and channel.
            Defaults to `"drop"`.
        inf: str or None. As `nan`, plus `"clip"`: +Inf/-Inf become the
            channel's finite max/min (saturated sensors). None: as `nan`.
        clip_sigma: float or None. Clip each channel to its mean +- this many
            standard deviations (outliers). Defaults to `None`.

    Returns:
        `x`, or `(x, y)` when `y` is given.

    Example:

    >>> import numpy as np, keras_microtune as kmt
    >>> x = np.array([[1.0, 2.0], [np.nan, 3.0], [3.0, 4.0]])
    >>> kmt.data.clean(x, nan="mean").tolist()
    [[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]
    """
    inf = nan if inf is None else inf
    for name, value, allowed in (("nan", nan, NAN_FIXES), ("inf", inf, INF_FIXES)):
        if value not in allowed:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected one of "
                f"{list(allowed)}. Received: {name}={value!r}"
            )
    if clip_sigma is not None and (
        isinstance(clip_sigma, bool)
        or not isinstance(clip_sigma, (int, float))
        or clip_sigma <= 0
    ):
        raise ValueError(
            "Received an invalid value for `clip_sigma`, expected None or a positive "
            f"number. Received: clip_sigma={clip_sigma!r}"
        )
    x = _as_array(x).copy()
    y = None if y is None else np.asarray(y)
    if y is not None and len(y) != len(x):
        raise ValueError(f"`x` has {len(x)} samples but `y` has {len(y)}.")
    channels = x.shape[-1] if x.ndim > 1 else 1
    _, mean, _, low, high = _channel_stats(x)
    keep = np.ones(len(x), bool)
    for kind, test, fix in (("NaN", np.isnan, nan), ("Inf", np.isinf, inf)):
        flat = x.reshape(-1, channels)
        hit = test(flat)
        if not hit.any():
            continue
        if fix == "raise":
            sample, channel = divmod(int(np.argmax(hit)), channels)
            sample //= max(1, flat.shape[0] // len(x))
            raise ValueError(
                f"`x` contains {kind} in sample {sample}, channel {channel} "
                f"({int(hit.sum())} value(s))."
            )
        if fix == "drop":
            keep &= ~test(x.reshape(len(x), -1)).any(axis=1)
            continue
        if fix == "clip":
            repl = np.where(flat > 0, high, low)
        else:
            repl = np.broadcast_to(mean if fix == "mean" else 0.0, flat.shape)
        flat[hit] = repl[hit]
    x, y = x[keep], (None if y is None else y[keep])
    if clip_sigma is not None and len(x):
        _, mean, std, _, _ = _channel_stats(x)
        flat = x.reshape(-1, channels)
        np.clip(flat, mean - clip_sigma * std, mean + clip_sigma * std, out=flat)
    x = x.astype("float32")
    return x if y is None else (x, y)


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
