"""Preprocessing that ships with the model: leading `Rescaling` / `Normalization`.

A model that starts with Keras' `Rescaling` or (adapted) `Normalization` layers
computes `x = raw * scale + offset` on its input. For microcontroller targets
the device should be fed raw values (sensor counts, pixel bytes), so:

- an affine with one scale and offset per tensor, or per channel of the
  last axis (Keras' `Normalization` default), every scale > 0: the layers are
  removed from the converted model and folded into the input's quantization.
  The device already turns each raw value into an integer,
  `q = round(raw / input_scale + zero_point)`; with the folded scale and zero
  point (one per channel for a per-channel affine) that same step yields the
  quantized normalized input exactly (the zero point may be fractional, so
  nothing is rounded away). No op runs on the device for the preprocessing.
  A per-channel affine must be folded this way: raw channels in different
  units (a wine's proline in mg/L next to its hue) share one int8 scale in a
  raw input tensor, which leaves the narrow channels a few levels or none
  (measured on scikit-learn's wine: 98.6% float, 50% with the int8 `MUL`).
- any other affine (varying along other axes, or a scale <= 0): the layers
  are replaced by one `Rescaling` (int8 `MUL`, plus `ADD` when there is an
  offset), calibrated on raw data, so the model's input tensor is in raw
  units.

`describe_input` states what the device must feed; `quantize_input` does it in
numpy, as the generated C helper `quantize_input()` does on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_microtune.optimize.affine import Affine, leading_affine

_DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


@dataclasses.dataclass
class Plan:
    """How a model's leading preprocessing is converted.

    Attributes:
        affine: the composed affine of the leading layers.
        model: the model to convert (without the layers when `folded`).
        folded: True when the affine lives in the input quantization.
    """

    affine: Affine
    model: object
    folded: bool

    def transform(self, xs):
        """Raw inputs -> what `model` takes (normalized when folded)."""
        if xs is None or not self.folded:
            return xs
        return [self.affine(xs[0]), *xs[1:]]


INPUT_TYPES = ("int8", "uint8", "int16")


def check_input_type(input_type, target):
    """Validate `convert(..., input_type=...)` for `target`; return it."""
    if input_type is None:
        return None
    if input_type not in INPUT_TYPES:
        raise ValueError(
            "Received an invalid value for `input_type`, expected None or one of "
            f"{list(INPUT_TYPES)}. Received: input_type={input_type!r}"
        )
    if not target.is_mcu:
        raise ValueError(
            f"`input_type` applies to microcontroller targets (TFLite Micro); "
            f"target {target.name!r} runs on LiteRT with "
            f"{target.io_dtype} inputs. Received: input_type={input_type!r}"
        )
    return input_type


def plan(model, target) -> Plan | None:
    """The preprocessing plan for `model` on `target` (None: nothing to do)."""
    if not (target.is_mcu and target.quantization == "int8"):
        return None
    affine, rest = leading_affine(model)
    if affine is None:
        return None
    if affine.folds:
        return Plan(affine, rest, folded=True)
    import keras

    # Otherwise: one Rescaling (int8 MUL, ADD) instead of the original layers.
    inp = keras.Input(model.inputs[0].shape[1:], name="raw_input")
    scaled = keras.layers.Rescaling(
        affine.scale[0].astype("float32"),
        affine.offset[0].astype("float32"),
        name="preprocessing",
    )(inp)
    return Plan(affine, keras.Model(inp, rest(scaled), name=model.name), False)


def describe_input(tflite: bytes, plan: Plan | None = None, info=None) -> dict:
    """What the device must feed to input 0, in raw units, as plain data.

    Keys: `dtype`, `shape`, `scale`, `zero_point` (raw = scale * (q -
    zero_point)), `raw_min`/`raw_max` (raw values representable without
    clipping), `preprocessing` (layers, folded or as ops) and `feed` (one
    sentence). A folded per-channel affine makes `scale`, `zero_point`,
    `raw_min` and `raw_max` lists, one number per channel of the last axis.
    `info`: `tflite` parsed (`_tflite.parse`), when known.
    """
    from keras_microtune.export import runtimes

    detail = runtimes.io_details(tflite, info=info)[0][0]
    dtype = np.dtype(detail["dtype"]).name
    shape = [int(d) for d in detail["shape"]]
    scale, zero = (float(v) for v in detail["quantization"])
    out = {"dtype": dtype, "shape": shape, "preprocessing": None}
    if dtype not in _DTYPE_RANGE or not scale:
        out["feed"] = f"{dtype} values of shape {shape}, raw (no quantization)."
        return out
    if plan is not None and plan.folded:
        a = _per_channel(plan.affine.scale)
        b = _per_channel(plan.affine.offset)
        # x = a*raw + b = scale*(q - zero)  =>  q = raw/(scale/a) + zero + b/scale.
        scale, zero = scale / a, zero + b / scale
        if plan.affine.per_tensor:
            scale, zero = float(scale[0]), float(zero[0])
    low, high = _DTYPE_RANGE[dtype]
    scale_a, zero_a = np.asarray(scale, "float64"), np.asarray(zero, "float64")
    out.update(
        scale=_number_or_list(scale_a),
        zero_point=_number_or_list(zero_a),
        zero_point_is_integer=bool(np.all(zero_a == np.round(zero_a))),
        raw_min=_number_or_list(scale_a * (low - zero_a)),
        raw_max=_number_or_list(scale_a * (high - zero_a)),
    )
    if plan is not None:
        out["preprocessing"] = {
            "layers": list(plan.affine.layers),
            "kinds": list(plan.affine.kinds),
            "folded": plan.folded,
            # Ops the preprocessing runs as on the device (none when folded).
            "ops": [] if plan.folded else _affine_ops(plan.affine),
            "scale": _plain(plan.affine.scale, plan.affine.per_tensor),
            "offset": _plain(plan.affine.offset, plan.affine.per_tensor),
        }
    out["feed"] = feed_sentence(out)
    return out


def _number_or_list(values):
    return float(values) if values.ndim == 0 else [float(v) for v in values]


def _affine_ops(affine):
    return ["MUL", "ADD"] if np.any(affine.offset) else ["MUL"]


def feed_sentence(input_report: dict) -> str:
    """One sentence on what to feed, from `describe_input`'s fields."""
    dtype, shape = input_report["dtype"], input_report["shape"]
    low, high = _DTYPE_RANGE[dtype]
    prep = input_report.get("preprocessing")
    where = ""
    if prep:
        if not prep["folded"]:
            how = f"kept in the model as int8 {'/'.join(prep['ops'])} ops"
        elif isinstance(input_report["scale"], list):
            how = "folded into these per-channel scales and zero points (no op)"
        else:
            how = "folded into this scale and zero point (no op on the device)"
        where = f" The model's {', '.join(prep['layers'])} preprocessing is {how}."
    f = {
        k: _show(input_report[k]) for k in ("scale", "zero_point", "raw_min", "raw_max")
    }
    if isinstance(input_report["scale"], list):
        return (
            f"Feed raw values (before any normalization) as {dtype}, shape {shape}, "
            "with one scale and zero point per channel c of the last axis: "
            "q = round(raw / scale[c] + zero_point[c]), clipped to "
            f"[{low}, {high}], scale = {f['scale']}, zero_point = "
            f"{f['zero_point']}; raw values from raw_min[c] to raw_max[c] are "
            f"represented without clipping (raw_min = {f['raw_min']}, raw_max = "
            f"{f['raw_max']}).{where}"
        )
    return (
        f"Feed raw values (before any normalization) as {dtype}, shape {shape}: "
        f"q = round(raw / {f['scale']} + {f['zero_point']}), clipped to "
        f"[{low}, {high}]; raw values from {f['raw_min']} to {f['raw_max']} are "
        f"represented without clipping.{where}"
    )


def _show(value, head=4):
    """A number, or a list of them shortened to its first `head`."""
    if not isinstance(value, list):
        return f"{value:.6g}"
    shown = ", ".join(f"{v:.6g}" for v in value[:head])
    more = f", ... ({len(value)} channels)" if len(value) > head else ""
    return f"[{shown}{more}]"


def _per_channel(values) -> np.ndarray:
    """An affine's `values` (per channel of the last axis) as one row."""
    values = np.asarray(values, "float64")
    return values.reshape(-1, values.shape[-1])[0]


def _plain(values, per_tensor):
    if per_tensor:
        return float(np.asarray(values).flat[0])
    return _per_channel(values).tolist()


def quantize_input(x: np.ndarray, input_report: dict) -> np.ndarray:
    """Raw float values -> the integers the device feeds (as `quantize_input()`
    in the generated `model_data.h`)."""
    if "dtype" not in input_report:  # Metadata this version cannot read.
        raise ValueError(input_report.get("feed", "The model's input is unknown."))
    dtype = input_report["dtype"]
    if "scale" not in input_report:
        return np.asarray(x).astype(dtype)
    low, high = _DTYPE_RANGE[dtype]
    # A list: one scale and zero point per channel of the last axis.
    scale = np.asarray(input_report["scale"], "float64")
    zero = np.asarray(input_report["zero_point"], "float64")
    q = np.asarray(x, "float64") / scale + zero
    return np.clip(np.round(q), low, high).astype(dtype)
