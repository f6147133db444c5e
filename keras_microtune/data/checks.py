"""Check and clean data before training or calibration.

`inspect(x)` reports, in a `DataReport`, NaN and Inf (which samples, which
channels), constant channels, outliers and per-channel statistics;
`clean(x, ...)` applies the chosen fix for each. NaN and Inf are what
`as_arrays` refuses when converting.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from keras_microtune.data.arrays import load_npz

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
