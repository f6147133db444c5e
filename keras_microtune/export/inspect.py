"""`kmt.inspect`: the conversion report for an existing `.tflite`."""

from __future__ import annotations

import os
import warnings

from keras_microtune._api import KerasMicrotuneWarning
from keras_microtune.export import (
    _tflite,
    input_metadata,
    pipeline,
    runtimes,
    stream_metadata,
)
from keras_microtune.export import targets as targets_lib
from keras_microtune.export._tflite import InvalidModelError
from keras_microtune.export.passes import measurements
from keras_microtune.export.result import ConversionResult

MAX_MODEL_BYTES = 1 << 31  # Flatbuffers address at most 2 GiB.

__all__ = ["InvalidModelError", "inspect"]

# The measurement passes of `kmt.convert` that need no source model.
PASSES = (measurements.arena, measurements.vela, measurements.budget)


def _read(path_or_bytes) -> tuple[bytes, str]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes), "model"
    if not isinstance(path_or_bytes, (str, os.PathLike)):
        raise TypeError(
            "Received an invalid value for `path_or_bytes`, expected a path or "
            f"bytes. Received: {type(path_or_bytes).__name__}"
        )
    path = os.fspath(path_or_bytes)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such .tflite file: {path!r}")
    if os.path.getsize(path) > MAX_MODEL_BYTES:
        raise InvalidModelError(f"{path!r} is larger than 2 GiB: not a TFLite model.")
    with open(path, "rb") as f:
        return f.read(), os.path.splitext(os.path.basename(path))[0]


def inspect(path_or_bytes, target: str | targets_lib.Target | None = None):
    """Measure an existing `.tflite` as `convert` does (without parity).

    Args:
        path_or_bytes: str, PathLike or bytes. The model.
        target: str, Target or None. Budgets to check. None picks `"mcu"` for a
            model with int8 inputs and outputs, else `"float32"` (no budgets).

    Returns:
        A `ConversionResult` whose `parity` is None. A model written by
        `convert` with a folded Rescaling/Normalization carries how raw values
        are fed (its `keras_microtune.input` metadata): it is in
        `report["input"]`, and `result.quantize_input` applies it. A
        streaming model (`convert(..., streaming=True)`) says so in its
        `keras_microtune.streaming` metadata: `report["streaming"]` gives the
        frame shape, sequence length, where the state lives and the
        `Reset()` rule (the arena is one invoke's: one frame).

    Raises:
        InvalidModelError: (a ValueError) the data is empty, truncated,
            corrupted or not a TFLite model, or TFLite Micro cannot run it. The
            TFLite Micro interpreter runs in a child process, so a hostile file
            cannot crash the caller.

    Warns:
        KerasMicrotuneWarning: the `keras_microtune.input` metadata has a
            version this keras_microtune does not read (`report["input"]`
            then says so instead of how to feed the model).
    """
    data, name = _read(path_or_bytes)
    info = _tflite.parse(data)
    if target is None:
        io = [info.tensors[t].dtype for t in info.inputs + info.outputs]
        target = "mcu" if io and all(d == "int8" for d in io) else "float32"
    feed = _input(data, info)  # Before measuring: a bad entry fails fast.
    stream = stream_metadata.read(data)
    c = pipeline.Conversion(data, targets_lib.get(target), name=name)
    c.set_tflite(data, info)
    try:
        pipeline.run(c, PASSES)
    except ValueError as e:
        raise InvalidModelError(str(e)) from None
    except runtimes.RuntimeFailure as e:
        raise InvalidModelError(f"TFLite Micro cannot run the model: {e}") from None
    c.report["conversion"] = {"quantization": c.target.quantization, "source": name}
    c.report["passes"] = c.passes
    result = ConversionResult(data, c.report, str(name), timings=c.timings)
    result._parsed = (data, info)
    if feed is not None:
        result.report["input"] = feed
    if stream is not None:
        result.report["streaming"] = stream
    return result


def _input(data: bytes, info) -> dict | None:
    """`report["input"]` from the file's input metadata (None without one)."""
    try:
        return input_metadata.read(data, info)
    except input_metadata.UnsupportedVersionError as e:
        warnings.warn(str(e), KerasMicrotuneWarning, stacklevel=3)
        return {
            "feed": f"unknown: {e}",
            "metadata": {
                "name": input_metadata.NAME,
                "version": e.version,
                "supported": False,
            },
        }
