"""That a `.tflite` is a streaming model, stored in the file itself.

A model from `convert(..., streaming=True)` takes one frame per invoke and
keeps its recurrent state between invokes; nothing in its tensors says so
(the `"fused"` form is an ordinary graph with a one-step LSTM). `convert`
writes the entry `keras_microtune.streaming` into the flatbuffer's
`Model.metadata`: UTF-8 JSON,

    {"version": 1, "timesteps": 100, "frame_shape": [6], "form": "fused",
     "sequence_output": false}

so that `kmt.evaluate` feeds whole sequences frame by frame (resetting the
state per sequence) and `kmt.inspect` reports it (`report["streaming"]`).
TFLite Micro and LiteRT ignore metadata they do not know.
"""

from __future__ import annotations

import json

from keras_microtune.export import _tflite
from keras_microtune.export._tflite import InvalidModelError
from keras_microtune.export.streaming import FORMS

NAME = "keras_microtune.streaming"
VERSION = 1
MAX_BYTES = 4096  # A larger entry is refused unread.
RESET = (
    "Feed one frame per invoke; call MicroInterpreter::Reset() before the "
    "first frame of each sequence (it zeroes the recurrent state)."
)


def write(tflite: bytes, described: dict) -> bytes:
    """`tflite` with `described` (`StepModel.describe()`) as its entry."""
    entry = {
        "version": VERSION,
        "timesteps": int(described["timesteps"]),
        "frame_shape": [int(d) for d in described["frame_shape"]],
        "form": described["form"],
        "sequence_output": bool(described["sequence_output"]),
    }
    payload = json.dumps(entry, separators=(",", ":")).encode("utf-8")
    return _tflite.with_metadata(tflite, NAME, payload)


def read(tflite: bytes) -> dict | None:
    """The entry with `reset` (what firmware does), or None for a file
    without one.

    Raises:
        InvalidModelError: (a ValueError) the entry is corrupted, or was
            written in a version this keras_microtune does not read.
    """
    found = _tflite.json_metadata(tflite, NAME, MAX_BYTES)
    if found is None:
        return None
    entry = found[0]
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        raise InvalidModelError(
            f"The {NAME!r} metadata is not version {VERSION}, the one this "
            f"keras_microtune reads: {str(entry)[:200]!r}. Upgrade "
            "keras_microtune, or convert the model again."
        )
    shape = entry.get("frame_shape")
    timesteps = entry.get("timesteps")
    valid = (
        isinstance(timesteps, int)
        and not isinstance(timesteps, bool)
        and timesteps > 0
        and isinstance(shape, list)
        and all(isinstance(d, int) and d > 0 for d in shape)
        and entry.get("form") in FORMS
        and isinstance(entry.get("sequence_output"), bool)
    )
    if not valid:
        raise InvalidModelError(
            f"The {NAME!r} metadata is invalid: {str(entry)[:200]!r}. Convert "
            "the model again."
        )
    return {
        "timesteps": timesteps,
        "frame_shape": shape,
        "form": entry["form"],
        "sequence_output": entry["sequence_output"],
        "reset": RESET,
    }
