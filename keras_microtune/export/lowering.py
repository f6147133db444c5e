"""Keras ops TFLite Micro cannot run in int8, rewritten with ops it can.

For TFLite Micro targets, `plan(model)` finds the layers whose TFLite ops
have no TFLite Micro int8 kernel and says how each is lowered:

- activations (a layer's `activation`, `keras.layers.Activation`,
  `keras.layers.ELU`): GELU (TFLite `GELU`, no TFLite Micro kernel) becomes
  the tanh form written with a sigmoid; ELU, SELU and CELU (TFLite `ELU` runs
  in float, `EXP` has no int8 kernel, `SELECT` none at all) use the exact
  identity `exp(m) - 1 = tanh(m/2) / (1 - sigmoid(m))`; mish, soft-shrink
  and sparse-plus are rewritten exactly;
- `LayerNormalization` (and `GroupNormalization`): Keras computes
  `x * inv - mean * inv`, whose `NEG` TFLite keeps in float (a
  DEQUANTIZE/QUANTIZE pair in an int8 model); over the last axis the
  lowered form is L2_NORMALIZATION of `[x - mean, sqrt(n eps)]` (no int8
  variance), elsewhere `(x - mean) * rsqrt(var + eps) * gamma + beta`: the
  same in float, and every op has an int8 TFLite Micro kernel.
  `RMSNormalization` and `UnitNormalization` square with `x * x` (TFLite
  keeps Keras' SQUARE in float).

Activations that cannot be lowered with these ops (softplus, exponential,
log-sigmoid, sparsemax; squareplus, whose int8 form through RSQRT lost 4% of
the output range) are refused before converting, naming the layer and
a replacement. `applied(lowerings)` swaps the lowered functions in while the
model is traced and restores the model afterwards: the model passed to
`kmt.convert` is never changed, and parity is measured against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import numpy as np

from keras_microtune.export import lowered_forms as forms

# Each lowered form's float error against Keras' activation is measured
# on this grid (and reported).
_GRID = np.linspace(-8.0, 8.0, 4097, dtype="float32")

# TensorFlow ops (in the traced graph) of activations that TFLite Micro cannot
# run in int8, left in a layer the plan could not rewrite (a Lambda, a custom
# layer): name -> (what it is, what to use instead).
_GELU_ADVICE = (
    "use Dense(..., activation='gelu') or keras.layers.Activation('gelu'), "
    "which kmt.convert lowers to ops TFLite Micro runs in int8"
)
_UNLOWERED_TF_OPS = {
    "Erf": ("GELU", _GELU_ADVICE),
    "Erfc": ("GELU", _GELU_ADVICE),
    "Softplus": ("softplus", "use activation='relu' or 'silu'"),
    "Selu": ("SELU", "use keras.layers.Activation('selu')"),
}


LOWERED = {
    "gelu": (
        forms.gelu,
        "x * sigmoid(1.5958 * c * (1 + 0.044715 * c^2)), c = clip(x, -4, 4)",
    ),
    "elu": (forms.elu, "relu(x) + tanh(m / 2) / (1 - sigmoid(m)), m = min(x, 0)"),
    "selu": (forms.selu, "1.0507 * elu(x, 1.6733), elu as for 'elu'"),
    "celu": (forms.celu, "relu(x) + tanh(m / 2) / (1 - sigmoid(m)), m = min(x, 0)"),
    "mish": (forms.mish, "x * n / (2 - n), n = s * (2 - s), s = sigmoid(x)"),
    "soft_shrink": (forms.soft_shrink, "x - clip(x, -0.5, 0.5)"),
    "sparse_plus": (forms.sparse_plus, "(clip(x, -1, 1) + 1)^2 / 4 + relu(x - 1)"),
}

REFUSED = {
    "softplus": "activation='relu' (or 'silu', which TFLite Micro runs as "
    "LOGISTIC and MUL)",
    "exponential": "a bounded activation such as 'sigmoid', or exp applied "
    "after the model on the device's CPU",
    "log_sigmoid": "activation='sigmoid' (take the log after the model)",
    "sparsemax": "activation='softmax'",
    "squareplus": "activation='silu' or 'relu'",
}
_REFUSED_WHY = {
    "softplus": "EXP and LOG",
    "exponential": "EXP",
    "log_sigmoid": "EXP and LOG",
    "sparsemax": "TOPK_V2 and CUMSUM",
    "squareplus": "SQRT",
}


@dataclasses.dataclass
class Lowering:
    """One layer attribute swapped while tracing.

    Attributes:
        layer: the layer object; `attr`: `"activation"`, `"call"`, or
            `"_act_fn"` (a QAT `QuantizeConv`);
        value: the lowered callable; `record`: the report entry (`layer`,
            `op`, `as`: the form traced, `exact`: equal in real arithmetic,
            and for activations `formula_max_abs_error`: float32 max error
            against Keras' function on [-8, 8]).
    """

    layer: object
    attr: str
    value: object
    record: dict


def _activation_names(fn) -> list[str]:
    """Keras (or tf_keras) activation names that `fn` is, if any."""
    import keras

    modules = [keras.activations]
    if "tf_keras" in sys.modules:
        modules.append(sys.modules["tf_keras"].activations)
    name = getattr(fn, "__name__", None)
    found = []
    for module in modules:
        try:
            if name and module.get(name) is fn:
                found.append(name)
        except (ValueError, TypeError):
            continue
    return found


def formula_error(name: str, **kwargs) -> float:
    """Max |lowered - Keras| of activation `name` on [-8, 8], in float32."""
    import keras
    from keras import ops

    exact = keras.activations.get(name)
    lowered, _ = LOWERED[name]
    diff = ops.abs(lowered(_GRID, **kwargs) - exact(_GRID, **kwargs))
    return float(ops.convert_to_numpy(ops.max(diff)))


_NORMALIZATIONS = {
    "LayerNormalization": (
        "layer_normalization",
        forms.layer_norm_call,
        "sqrt(n) * l2_normalize([d, sqrt(n eps)])[:n] * gamma + beta, "
        "d = x - mean (last axis; else d * rsqrt(var + eps) ...), no NEG",
    ),
    "RMSNormalization": (
        "rms_normalization",
        forms.rms_norm_call,
        "x * rsqrt(mean(x * x) + eps) * scale (no SQUARE)",
    ),
    "UnitNormalization": (
        "unit_normalization",
        forms.unit_norm_call,
        "x * rsqrt(max(mean(x * x), eps^2 / n)) / sqrt(n) (no SQUARE, SUM)",
    ),
    "GroupNormalization": (
        "group_normalization",
        forms.group_norm_call,
        "per group (x - mean) * rsqrt(var + eps) * gamma + beta (no NEG)",
    ),
}


def _activation_lowering(layer, fn, kwargs=None):
    """A `Lowering` for `layer`'s activation `fn`, None when it needs none.

    Raises:
        ValueError: the activation has no int8 TFLite Micro form.
    """
    names = _activation_names(fn)
    if not names:
        return None
    name = names[0]
    if name in REFUSED:
        raise ValueError(
            f"Layer {layer.name!r} uses activation {name!r}, which TFLite Micro "
            f"cannot run in int8 (its TFLite ops {_REFUSED_WHY[name]} have no "
            "int8 TFLite Micro kernel) and which has no exact form in ops it "
            f"has. Replace it with {REFUSED[name]}, or convert for a mobile "
            "target (e.g. 'mobile-int8')."
        )
    if name not in LOWERED:
        return None
    kwargs = kwargs or {}
    lowered = LOWERED[name][0]
    record = {
        "layer": layer.name,
        "op": name,
        "as": LOWERED[name][1],
        "exact": name != "gelu",
        "formula_max_abs_error": formula_error(name, **kwargs),
    }
    return Lowering(layer, "activation", lambda x: lowered(x, **kwargs), record)


def _lowering_of(layer):
    import keras

    for name, (op, factory, form) in _NORMALIZATIONS.items():
        cls = getattr(keras.layers, name, None)
        if cls is not None and type(layer) is cls:  # Subclasses keep their call.
            record = {"layer": layer.name, "op": op, "as": form, "exact": True}
            return Lowering(layer, "call", factory(layer), record)
    if isinstance(layer, keras.layers.ELU):
        low = _activation_lowering(layer, keras.activations.elu, {"alpha": layer.alpha})
        if low is not None:
            low.attr = "call"
        return low
    from keras_microtune.optimize.quantize_conv import QuantizeConv

    if isinstance(layer, QuantizeConv):  # QAT applies the activation itself.
        low = _activation_lowering(layer, layer._act_fn)
        if low is not None:
            low.attr = "_act_fn"
        return low
    fn = getattr(layer, "activation", None)
    if callable(fn):
        return _activation_lowering(layer, fn)
    return None


def plan(model) -> list[Lowering]:
    """The lowerings `model` needs to run in int8 in TFLite Micro.

    Args:
        model: a Keras (or tf_keras) model; nested layers are searched.

    Returns:
        list of `Lowering`, one per layer to rewrite (empty: nothing to do).

    Raises:
        ValueError: a layer uses an activation TFLite Micro cannot run in int8
            and that has no form in ops it has (the message names the layer
            and a replacement).
    """
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:  # A SavedModel signature: nothing to rewrite.
        return []
    from keras_microtune.optimize.quantize_conv import QuantizeConv
    from keras_microtune.optimize.quantize_norm import QuantizeLayerNorm

    layers = list(flatten(include_self=False, recursive=True))
    wrappers = (QuantizeConv, QuantizeLayerNorm)  # They compute the layer.
    wrapped = {id(x.layer) for x in layers if isinstance(x, wrappers)}
    lowerings = []
    for layer in layers:
        if id(layer) in wrapped:  # Its QAT wrapper computes it.
            continue
        low = _lowering_of(layer)
        if low is not None:
            lowerings.append(low)
    return lowerings


@contextlib.contextmanager
def applied(lowerings):
    """Swap each lowering into its layer for the duration; always restore."""
    saved = []
    try:
        for low in lowerings:
            had = low.attr in vars(low.layer)
            saved.append((low, had, vars(low.layer).get(low.attr)))
            setattr(low.layer, low.attr, low.value)
        yield
    finally:
        for low, had, value in reversed(saved):
            if had:
                setattr(low.layer, low.attr, value)
            else:
                delattr(low.layer, low.attr)


def unlowered(graph_ops: set) -> dict:
    """TensorFlow ops in `graph_ops` of activations TFLite Micro cannot run in
    int8, with what they are and the advice: op -> (what, advice)."""
    found = {op: _UNLOWERED_TF_OPS[op] for op in graph_ops if op in _UNLOWERED_TF_OPS}
    if "Pow" in graph_ops and "Tanh" in graph_ops:  # GELU's tanh form, hand-written.
        found["Pow"] = ("GELU (tanh form)", _GELU_ADVICE)
    return found
