"""How raw values are fed, stored in the `.tflite` itself.

A model whose leading `Rescaling`/`Normalization` is folded into its input
quantization has an input tensor in normalized units: its own scale and zero
point do not say how a raw sensor value becomes an integer. `convert` writes
that transform into the flatbuffer's `Model.metadata` as the entry
`keras_microtune.input`: UTF-8 JSON,

    {"version": 1, "input": 0, "dtype": "int8", "shape": [1, 64],
     "scale": 0.73, "zero_point": -12.5, "raw_min": 84.3, "raw_max": 270.4,
     "preprocessing": {"layers": ["normalization"], "kinds": ["Normalization"],
                       "folded": true, "ops": [], "scale": 0.01, "offset": -1.9}}

The device feeds input `input` with `q = round(raw / scale + zero_point)`,
clipped to the dtype's range (`zero_point` may be fractional); `raw_min` and
`raw_max` are the raw values represented without clipping. `preprocessing`
names the layers (`x = raw * scale + offset`), whether they were folded, and
the ops they run as when not folded (int8 `MUL`/`ADD`, and the input tensor
is then in raw units).

Version 2 (written only for a folded per-channel affine, e.g. Keras'
`Normalization` over the last axis): `scale`, `zero_point`, `raw_min` and
`raw_max` are lists, one number per channel of the last axis, and channel c
is fed with `q = round(raw / scale[c] + zero_point[c])`. Every other entry
stays version 1, so files a version-1 reader can feed keep version 1.

Readers ignore fields they do not know; `version` changes only when an
existing field changes meaning. TFLite Micro and LiteRT ignore metadata they
do not know, so the entry changes neither the arena nor the outputs.
"""

from __future__ import annotations

import json
import math

from keras_microtune.export import _tflite, preprocessing
from keras_microtune.export._tflite import InvalidModelError

NAME = "keras_microtune.input"
VERSIONS = (1, 2)  # Versions this reads; `version_for` picks the one written.
MAX_BYTES = 64 * 1024  # A larger entry is refused unread.
_FIELDS = ("dtype", "shape", "scale", "zero_point", "raw_min", "raw_max")


class UnsupportedVersionError(ValueError):
    """The entry was written by a newer keras_microtune, in a format this one
    does not read (`version`: the entry's)."""

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version


def version_for(input_report: dict) -> int:
    """The entry version `write` uses: 2 for per-channel fields, else 1."""
    return 2 if isinstance(input_report["scale"], list) else 1


def write(tflite: bytes, input_report: dict) -> bytes:
    """Return `tflite` with `input_report` (`describe_input`'s dict for input 0)
    stored as its `keras_microtune.input` metadata entry (replacing any)."""
    entry = {"version": version_for(input_report), "input": 0}
    entry.update({k: input_report[k] for k in _FIELDS})
    entry["preprocessing"] = input_report.get("preprocessing")
    payload = json.dumps(entry, separators=(",", ":"), allow_nan=False)
    return _tflite.with_metadata(tflite, NAME, payload.encode("utf-8"))


def read(tflite: bytes, info: _tflite.ModelInfo | None = None) -> dict | None:
    """The input transform stored in `tflite`, or None for a file without one.

    Returns the same dict as `report["input"]` (usable by
    `preprocessing.quantize_input`), with `metadata`: `{"name", "version",
    "bytes"}`.

    Raises:
        UnsupportedVersionError: (a ValueError) the entry has a version this
            keras_microtune does not read.
        InvalidModelError: (a ValueError) the entry is corrupted or does not
            match the model's input tensor.
    """
    found = _tflite.json_metadata(tflite, NAME, MAX_BYTES)
    if found is None:
        return None
    entry, size = found
    version = entry.get("version") if isinstance(entry, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidModelError(
            f"The {NAME!r} metadata has no integer 'version'; received "
            f"{str(entry)[:200]!r}."
        )
    if version not in VERSIONS:
        from keras_microtune import __version__

        raise UnsupportedVersionError(
            f"The model's {NAME!r} metadata (how raw inputs are fed) has version "
            f"{version}; keras_microtune {__version__} reads versions "
            f"{', '.join(map(str, VERSIONS))}. "
            "Feeding raw values without it would give wrong results: upgrade "
            "keras_microtune (pip install -U keras-microtune), or quantize inputs "
            "yourself as the entry says (README: 'Reading the input entry').",
            version,
        )
    out = _checked(entry, version)
    info = info or _tflite.parse(tflite)
    first = info.inputs[0] if info.inputs else -1
    tensor = info.tensors[first] if first >= 0 else None
    if tensor is None or (
        (tensor.dtype, list(tensor.shape)) != (out["dtype"], out["shape"])
    ):
        found = "none" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
        raise InvalidModelError(
            f"The {NAME!r} metadata describes a {out['dtype']} {out['shape']} "
            f"input but the model's input is {found}: the file was changed after "
            "conversion. Convert the model again."
        )
    out["feed"] = preprocessing.feed_sentence(out)
    out["metadata"] = {"name": NAME, "version": version, "bytes": size}
    return out


def _checked(entry: dict, version: int = 1) -> dict:
    """The entry's fields, type-checked; InvalidModelError otherwise."""

    def bad(field):
        return InvalidModelError(
            f"The {NAME!r} metadata has an invalid {field!r}: "
            f"{str(entry.get(field))[:100]!r}. Convert the model again."
        )

    out = {}
    if entry.get("dtype") not in preprocessing.INPUT_TYPES:
        raise bad("dtype")
    out["dtype"] = entry["dtype"]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and d >= 0 for d in shape
    ):
        raise bad("shape")
    out["shape"] = shape
    if not isinstance(entry.get("input", 0), int) or entry.get("input", 0) != 0:
        raise bad("input")  # Version 1 describes input 0 only.
    channels = shape[-1] if shape else None
    for field in _FIELDS[2:]:
        value = entry.get(field)
        # Version 2: a list, one number per channel of the last axis.
        many = version >= 2 and isinstance(value, list)
        if many and len(value) != channels:
            raise bad(field)
        numbers = value if many else [value]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(field)
            if not math.isfinite(v) or (field == "scale" and v <= 0):
                raise bad(field)
        out[field] = [float(v) for v in value] if many else float(value)
    if len({isinstance(out[f], list) for f in _FIELDS[2:]}) != 1:
        raise bad("scale")  # All four per channel, or none.
    zeros = (
        out["zero_point"]
        if isinstance(out["zero_point"], list)
        else [out["zero_point"]]
    )
    out["zero_point_is_integer"] = all(z == round(z) for z in zeros)
    prep = entry.get("preprocessing")
    if prep is not None and not (
        isinstance(prep, dict)
        and isinstance(prep.get("layers"), list)
        and all(isinstance(n, str) for n in prep["layers"])
        and isinstance(prep.get("folded"), bool)
        and isinstance(prep.get("ops", []), list)
        and all(isinstance(n, str) for n in prep.get("ops", []))
    ):
        raise bad("preprocessing")
    out["preprocessing"] = prep and {"ops": [], **prep}
    return out
