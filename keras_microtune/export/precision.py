"""Mixed precision: chosen Keras layers in int16x8 or float32, the rest int8.

`convert(..., precision={"layer name or regex": "int16" | "float32"})`.
The model is calibrated once (the TFLite converter's calibration-only mode),
then quantized from that one calibration:
- float32 layers through the TFLite quantizer's `denylisted_nodes` (the ops
  stay float; DEQUANTIZE before, QUANTIZE after);
- int16 layers (16-bit activations, 8-bit weights, 64-bit biases) by taking
  their ops from a 16x8 quantization of the same calibration and putting
  QUANTIZE ops (int8 <-> int16 requantization) at the borders
  (`splice16.splice`).

Only layer types whose op TFLite Micro runs at the asked precision are
accepted (`KERNELS`, each entry run in TFLite Micro by
`tests/export/test_precision.py`); any other layer is refused before
converting, naming the layer and its op. `"auto"` raises the layers that
lose the most SQNR (`auto`), within a flatbuffer size budget.
"""

from __future__ import annotations

import re

from keras_microtune.export import _tflite, splice16

DTYPES = ("int8", "int16", "float32")
# Keras layer class -> (TFLite op it lowers to, precisions TFLite Micro runs).
_BOTH = ("int16", "float32")
KERNELS = {
    "Dense": ("FULLY_CONNECTED", _BOTH),
    "Conv1D": ("CONV_2D", _BOTH),
    "Conv2D": ("CONV_2D", _BOTH),
    "DepthwiseConv2D": ("DEPTHWISE_CONV_2D", _BOTH),
    "ReLU": ("RELU", _BOTH),
    "MaxPooling1D": ("MAX_POOL_2D", _BOTH),
    "MaxPooling2D": ("MAX_POOL_2D", _BOTH),
    "AveragePooling1D": ("AVERAGE_POOL_2D", _BOTH),
    "AveragePooling2D": ("AVERAGE_POOL_2D", _BOTH),
    "GlobalAveragePooling1D": ("MEAN", _BOTH),
    "GlobalAveragePooling2D": ("MEAN", _BOTH),
    "Softmax": ("SOFTMAX", _BOTH),
    "Flatten": ("RESHAPE", _BOTH),
    "Reshape": ("RESHAPE", _BOTH),
    "BatchNormalization": ("MUL", _BOTH),
    "Add": ("ADD", _BOTH),
    "Multiply": ("MUL", _BOTH),
    "Concatenate": ("CONCATENATION", _BOTH),
    # Lowered to MEAN/SUB/CONCATENATION/L2_NORMALIZATION (`lowering`):
    # TFLite Micro's L2_NORMALIZATION runs float32 and int8 only (its
    # Prepare refuses int16), so no int16 LayerNorm.
    "LayerNormalization": ("L2_NORMALIZATION", ("float32",)),
}
# Activations (of an Activation layer, or fused into Dense/Conv): their op.
ACTIVATIONS = {
    "linear": ("-", _BOTH),
    "relu": ("RELU", _BOTH),
    "relu6": ("RELU6", _BOTH),
    "tanh": ("TANH", _BOTH),
    "sigmoid": ("LOGISTIC", _BOTH),
    "softmax": ("SOFTMAX", _BOTH),
    "hard_silu": ("HARD_SWISH", ("float32",)),  # keras "hard_swish"
}
# precision="auto": raise layers until every layer reaches this SQNR, the
# flatbuffer would grow by more than this ratio (or these bytes, whichever is
# larger: each int16 layer adds about 0.5-1 KiB of QUANTIZE ops and tensor
# tables), or after this many trials.
AUTO_GOAL_DB = 30.0
AUTO_MAX_SIZE_RATIO = 1.10
AUTO_MIN_BUDGET_BYTES = 2048
AUTO_MAX_STEPS = 6


def check(precision, target, input_type=None):
    """Validate `convert(..., precision=...)` before anything runs."""
    if precision is None:
        return None
    if target.quantization != "int8":
        raise ValueError(
            f"`precision` applies to int8 targets (mcu targets, 'mobile-int8'); "
            f"target {target.name!r} quantizes to {target.quantization!r}. "
            "Pass precision=None, or choose an int8 target."
        )
    if input_type not in (None, "int8"):
        raise ValueError(
            "`precision` cannot be combined with `input_type` "
            f"{input_type!r}: it mixes precisions around int8 inputs. Received: "
            f"input_type={input_type!r}, precision={precision!r}"
        )
    if precision == "auto":
        return "auto"
    if not isinstance(precision, dict) or not precision:
        raise ValueError(
            "Received an invalid value for `precision`, expected None, 'auto' or a "
            "non-empty dict {'layer name or regex': 'int16' | 'float32'}. "
            f"Received: precision={precision!r}"
        )
    for key, dtype in precision.items():
        if not isinstance(key, str):
            raise ValueError(
                f"`precision` keys must be layer names or regexes (str). "
                f"Received: {key!r}"
            )
        if dtype not in DTYPES:
            raise ValueError(
                f"Received an invalid precision for {key!r}, expected one of "
                f"{list(DTYPES)}. Received: {dtype!r}"
            )
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(
                f"`precision` key {key!r} is not a valid regex: {e}"
            ) from None
    return dict(precision)


def layer_op(layer) -> tuple[str, tuple]:
    """`(TFLite op, precisions TFLite Micro runs)` for a Keras layer; an
    unknown layer type runs in int8 only (`("?", ())`)."""
    kind = type(layer).__name__
    activation = getattr(layer, "activation", None)
    act_name = getattr(activation, "__name__", None) if activation else None
    if kind == "Activation":
        return ACTIVATIONS.get(act_name, (act_name or "?", ()))
    if kind not in KERNELS:
        return "?", ()
    op, allowed = KERNELS[kind]
    if act_name not in (None, "linear"):
        act_op, act_allowed = ACTIVATIONS.get(act_name, (act_name, ()))
        allowed = tuple(p for p in allowed if p in act_allowed)
        op = f"{op}+{act_op}"
    return op, allowed


def resolve(model, spec: dict) -> dict[str, str]:
    """`{layer name: dtype}` for the layers `spec` names; refuse unknown names
    and layers whose op TFLite Micro cannot run at the asked precision."""
    layers = [ly for ly in model.layers if type(ly).__name__ != "InputLayer"]
    chosen = {}
    for key, dtype in spec.items():
        matched = [ly for ly in layers if ly.name == key or re.fullmatch(key, ly.name)]
        if not matched:
            raise ValueError(
                f"`precision` key {key!r} matches no layer of model "
                f"{model.name!r}. Layers: {[ly.name for ly in layers]}"
            )
        for layer in matched:
            chosen[layer.name] = dtype
    for layer in layers:
        dtype = chosen.get(layer.name, "int8")
        op, allowed = layer_op(layer)
        if dtype != "int8" and dtype not in allowed:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}, TFLite op {op}) "
                f"cannot run in {dtype} in TFLite Micro: it is verified in "
                f"{['int8', *allowed]} only. Choose one of these for "
                f"{layer.name!r} in `precision`, or leave it int8."
            )
    return {k: v for k, v in chosen.items() if v != "int8"}


def calibrate(model, concrete, representative) -> bytes:
    """The float flatbuffer with calibration statistics (not yet quantized);
    `representative` is the TFLite converter's `representative_dataset`."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    conv.experimental_lower_to_saved_model = False
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv._experimental_calibrate_only = True
    return conv.convert()


def quantize_16x8(model, concrete, representative) -> bytes:
    """The whole model in TFLite's 16x8 mode (float I/O), from which `splice`
    takes the int16 layers' ops (TFLite's 16x8 quantizer calibrates itself)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    conv.experimental_lower_to_saved_model = False
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_ops = [  # Float where 16x8 has no kernel.
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,
    ]
    conv.representative_dataset = representative
    return conv.convert()


def quantize(calibrated, cal_info, owner, choice, target, q16=None) -> bytes:
    """Quantize `calibrated` with each layer at its `choice` dtype.

    Args:
        calibrated: bytes from `calibrate`.
        cal_info: its `_tflite.parse`.
        owner: tensor index of `cal_info` -> Keras layer name.
        choice: `{layer name: "int16" | "float32"}`; other layers int8.
        target: the `Target` (int8 or float I/O).
        q16: a callable returning `quantize_16x8`'s model (called only when
            a layer is int16).
    """
    import tensorflow as tf
    from tensorflow.lite.python import convert as tf_convert

    io = tf.int8 if target.io_dtype == "int8" else tf.float32
    deny = [
        cal_info.tensors[t].name
        for _, _, outs in cal_info.op_sequence
        for t in outs
        if choice.get(owner.get(t)) == "float32"
    ]
    q8 = tf_convert.mlir_quantize(
        calibrated,
        fully_quantize=True,
        input_data_type=io,
        output_data_type=io,
        denylisted_nodes=deny or None,
    )
    wide = [
        k
        for k, (_, _, outs) in enumerate(cal_info.op_sequence)
        if any(choice.get(owner.get(t)) == "int16" for t in outs)
    ]
    if not wide:
        return q8
    return splice16.splice(q8, q16(), wide)


class Mixed:
    """One calibration of a model, quantized with any choice of precisions.

    Args:
        model: the traced Keras model; concrete: its trace; representative:
            the TFLite converter's `representative_dataset` (a generator
            function of calibration samples); target: the `Target`.
    """

    def __init__(self, model, concrete, representative, target):
        from keras_microtune.export import layer_errors

        self.model, self.concrete, self.target = model, concrete, target
        self.representative = representative
        self.calibrated = calibrate(model, concrete, representative)
        self.cal_info = _tflite.parse(self.calibrated)
        owners = layer_errors.owners(model, concrete, self.cal_info)
        self.owner = {t: layer.name for t, layer in owners.items()}
        self._q16 = None
        self._built = {}
        self.baseline = self.build({})

    def q16(self) -> bytes:
        if self._q16 is None:
            self._q16 = quantize_16x8(self.model, self.concrete, self.representative)
        return self._q16

    def build(self, choice: dict) -> bytes:
        """The flatbuffer with `choice` ({layer: dtype}), other layers int8."""
        key = tuple(sorted(choice.items()))
        if key not in self._built:
            self._built[key] = quantize(
                self.calibrated,
                self.cal_info,
                self.owner,
                choice,
                self.target,
                self.q16,
            )
        return self._built[key]


def costs(size: int, size_int8: int, arena: int | None, arena_int8) -> dict:
    """Size and arena of the mixed model against all-int8."""
    baseline_arena = arena_int8
    return {
        "size_bytes": size,
        "size_bytes_int8": size_int8,
        "size_added_bytes": size - size_int8,
        "arena_bytes": arena,
        "arena_bytes_int8": baseline_arena,
        "arena_added_bytes": None
        if arena is None or baseline_arena is None
        else arena - baseline_arena,
    }


def layer_bytes(info, owner, dtype_of) -> dict[str, dict]:
    """Per layer: weight/bias bytes and activation bytes of its ops in `info`."""
    out = {}
    for _, ins, outs in info.op_sequence:
        layers = {owner.get(t) for t in outs} - {None}
        if len(layers) != 1:
            continue
        (layer,) = layers
        row = out.setdefault(
            layer, {"dtype": dtype_of(layer), "weight_bytes": 0, "activation_bytes": 0}
        )
        row["weight_bytes"] += sum(
            info.tensors[t].nbytes for t in ins if t >= 0 and info.tensors[t].constant
        )
        row["activation_bytes"] += sum(info.tensors[t].nbytes for t in outs)
    return out


def sqnr_drops(rows, order) -> list[tuple[float, str]]:
    """`(SQNR lost at the layer, layer)`, largest loss first: a layer's SQNR
    against the best SQNR of the layers before it."""
    by_layer = {r["layer"]: r["sqnr_db"] for r in rows}
    drops, best_before = [], None
    for name in order:
        if name not in by_layer:
            continue
        value = by_layer[name]
        before = best_before if best_before is not None else 100.0
        drops.append((before - value, name))
        best_before = value
    return sorted(drops, key=lambda d: -d[0])


def auto(mixed, rows, measure, order, start=None) -> tuple[dict, bytes, list, list]:
    """`precision="auto"`: raise, one at a time, the layer that loses the most
    SQNR (to int16 where TFLite Micro has the kernel, else float32), keeping
    a raise only when it lifts the worst layer's SQNR, until every layer
    reaches `AUTO_GOAL_DB` or `AUTO_MAX_STEPS` raises were tried; a raise
    that would grow the flatbuffer beyond `AUTO_MAX_SIZE_RATIO` of all-int8
    (at least `AUTO_MIN_BUDGET_BYTES` more) is skipped.

    Args:
        mixed: the `Mixed` state; rows: all-int8 `layer_errors` rows;
        measure: flatbuffer -> its `layer_errors` rows; order: layer names
            in execution order; start: `{layer: dtype}` already chosen (the
            layers TFLite's quantizer leaves in float), `rows` measured with it.

    Returns:
        `(choice, tflite, rows, steps)`; `steps` records each trial.
    """
    layers = {ly.name: ly for ly in mixed.model.layers}
    choice = dict(start or {})
    tflite, steps, tried = mixed.build(choice), [], set()
    size_int8 = len(_tflite.strip(tflite))
    budget = max(AUTO_MAX_SIZE_RATIO * size_int8, size_int8 + AUTO_MIN_BUDGET_BYTES)
    while len(steps) < AUTO_MAX_STEPS and rows:
        worst = min(r["sqnr_db"] for r in rows)
        if worst >= AUTO_GOAL_DB:
            break
        candidates = [
            name
            for _, name in sqnr_drops(rows, order)
            if name not in tried and name not in choice and layer_op(layers[name])[1]
        ]
        if not candidates:
            break
        name = candidates[0]
        tried.add(name)
        dtype = "int16" if "int16" in layer_op(layers[name])[1] else "float32"
        trial_choice = {**choice, name: dtype}
        trial = mixed.build(trial_choice)
        size = len(_tflite.strip(trial))  # As deployed: without tensor names.
        step = {"layer": name, "dtype": dtype, "size_bytes": size}
        if size > budget:
            step["kept"] = False
            step["why"] = f"over the size budget ({int(budget):,} bytes)"
            steps.append(step)
            continue
        trial_rows = measure(trial)
        trial_worst = min(r["sqnr_db"] for r in trial_rows)
        step["worst_sqnr_db"] = trial_worst
        step["kept"] = trial_worst > worst
        if step["kept"]:
            choice, tflite, rows = trial_choice, trial, trial_rows
        else:
            step["why"] = "did not raise the worst layer's SQNR"
        steps.append(step)
    return choice, tflite, rows, steps
