"""Flatbuffer passes: checks and rewrites of the converted `.tflite`.

Each pass takes the `pipeline.Conversion` and returns what it did (None: not
applicable). A pass that rewrites the model sets `c.tflite` (or calls
`c.set_tflite(data, info)` when it already parsed the new bytes); the runner
records `bytes_before` / `bytes_after`. In order: `check_mcu_ops`,
`check_softmax_scale`, `check_full_int8`, (`measurements.layer_errors`),
`auto_precision`, `patch_inference`, `strip`, `compress`, `memory_plan`,
`input_metadata`, `streaming_metadata`.
"""

from __future__ import annotations

import contextlib

import numpy as np

from keras_microtune.export import _tflite, patching, preprocessing, runtimes
from keras_microtune.export import compression as compression_lib
from keras_microtune.export import input_metadata as input_metadata_lib
from keras_microtune.export import memory_plan as memory_plan_lib
from keras_microtune.export import patch_inference as patch_lib
from keras_microtune.export import stream_metadata as stream_metadata_lib

# Ops that must never reach a microcontroller model.
MCU_FORBIDDEN = {
    "VAR_HANDLE",
    "READ_VARIABLE",
    "ASSIGN_VARIABLE",
    "WHILE",
    "CALL_ONCE",
}
# What a streaming model (`convert(streaming=True)`) keeps its state with.
STATE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}


def check_mcu_ops(c):
    """TFLite Micro targets: builtin int8 ops and int8 (or `input_type`) I/O."""
    if not c.target.is_mcu:
        return None
    allowed = STATE_OPS if c.stream else set()
    check_ops(c.info, c.target, c.options["input_type"], c.converted_model, allowed)
    return {"ops_checked": len(c.info.ops)}


# Ops that only move values: left in float between DEQUANTIZE and QUANTIZE
# (the quantizer does so for an unrolled GRU's gate SPLIT, depending on the
# weights) they compute nothing in float; reported, not refused. So are the
# resource-variable ops of a streaming model, whose state stays float32.
DATA_MOVEMENT_OPS = {
    "VAR_HANDLE",
    "READ_VARIABLE",
    "ASSIGN_VARIABLE",
    "CALL_ONCE",
    "SPLIT",
    "SPLIT_V",
    "RESHAPE",
    "SQUEEZE",
    "EXPAND_DIMS",
    "CONCATENATION",
    "STRIDED_SLICE",
    "SLICE",
    "GATHER",
    "TRANSPOSE",
    "PACK",
    "UNPACK",
}


def check_full_int8(c):
    """TFLite Micro targets: name the layers still computed in float (ops
    between a DEQUANTIZE and a QUANTIZE) and refuse them unless
    `precision` asked for float32 there (ops that only move values, e.g. a
    SPLIT, are reported with `"data_movement": True` and not refused)."""
    if not c.target.is_mcu:
        return None
    rows = float_layers(c.converted_model, c.concrete, c.info)
    for row in rows:
        row["data_movement"] = row["op"] in DATA_MOVEMENT_OPS
    c.report["float_layers"] = rows
    asked = c.precision if isinstance(c.precision, dict) else {}
    if c.precision == "auto":  # "auto" takes float32 where TFLite Micro has it.
        asked = auto_float_layers(c.converted_model, rows)
    bad = [
        r for r in rows if asked.get(r["layer"]) != "float32" and not r["data_movement"]
    ]
    if bad:
        named = ", ".join(f"{r['layer']!r} ({r['op']})" for r in bad)
        raise ValueError(
            f"Target {c.target.name!r} is full int8, but the converted model "
            f"computes these layers in float: {named}; TFLite's quantizer has no "
            "int8 kernel for their ops, so it left DEQUANTIZE/QUANTIZE around "
            "them. Replace these layers with ones that have int8 kernels, or "
            "accept float there with precision={<layer>: 'float32'}."
        )
    return {"float_layers": [r["layer"] for r in rows]}


WEIGHT_QUANTIZATION = ("per_channel", "per_tensor")


def check_weight_quantization(value, target, precision=None) -> str:
    """Validate `convert(weight_quantization=...)` before converting."""
    if value not in WEIGHT_QUANTIZATION:
        raise ValueError(
            "Received an invalid value for `weight_quantization`, expected one "
            f"of {WEIGHT_QUANTIZATION}. Received: weight_quantization={value!r}"
        )
    if value == "per_tensor" and not (target.is_mcu and target.quantization == "int8"):
        raise ValueError(
            f"weight_quantization='per_tensor' applies to int8 TFLite Micro "
            f"targets; target {target.name!r} is not one. Use the default "
            "'per_channel', or a target such as 'mcu' or 'cortex-m4'."
        )
    if value == "per_tensor" and precision is not None:
        raise ValueError(
            "weight_quantization='per_tensor' cannot be combined with "
            f"precision={precision!r} (the mixed-precision converter quantizes "
            "per channel). Use one of them."
        )
    return value


def per_tensor_weights(c):
    """`weight_quantization="per_tensor"`: check that every int8 kernel of a
    weight op has one scale and record what per-channel quantization would
    have stored for them (`report["weight_quantization"]`)."""
    if c.options.get("weight_quantization") != "per_tensor":
        return None
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    model = model_editor.read(bytes(c.tflite))
    kernels, channels, per_channel = 0, 0, []
    for sub in model.subgraphs:
        for op in sub.operators:
            position = compression_lib.WEIGHT_OPS.get(op.opcode_name)
            if position is None:
                continue
            tensor = op.inputs[position] if len(op.inputs) > position else None
            if tensor is None or tensor.buffer is None or not len(tensor.buffer.data):
                continue
            quant = tensor.quantization
            scales = 0 if quant is None else int(np.size(quant.scales))
            kernels += 1
            if scales > 1:
                per_channel.append(op.opcode_name)
            channels += int(tensor.shape[int(quant.axis or 0)]) if quant else 0
    if per_channel:
        from keras_microtune.export.result import VerificationError

        raise VerificationError(
            "weight_quantization='per_tensor' asked for one scale per kernel, "
            f"but the converter left per-channel scales on {len(per_channel)} "
            f"kernels ({sorted(set(per_channel))}). Use "
            "weight_quantization='per_channel' for this model."
        )
    c.report["weight_quantization"] = {
        "mode": "per_tensor",
        "kernels": kernels,
        # Per channel: a float32 scale and an int64 zero point per channel.
        "per_channel_bytes_avoided": 12 * max(channels - kernels, 0),
    }
    return dict(c.report["weight_quantization"])


def auto_float_layers(model, rows) -> dict[str, str]:
    """`precision="auto"`: the layers the quantizer left in float whose op
    TFLite Micro runs in float32 (`precision.layer_op`), as `{layer: "float32"}`."""
    from keras_microtune.export import precision

    layers = {ly.name: ly for ly in getattr(model, "layers", [])}
    return {
        r["layer"]: "float32"
        for r in rows
        if r["layer"] in layers
        and "float32" in precision.layer_op(layers[r["layer"]])[1]
    }


def float_layers(model, concrete, info) -> list[dict]:
    """`{"layer", "op"}` for each op computing in float (not QUANTIZE or
    DEQUANTIZE), by the Keras layer its output tensor belongs to."""
    import keras

    from keras_microtune.export import layer_errors
    from keras_microtune.optimize import graph

    owner = {}
    if isinstance(model, keras.Model) and graph.is_graph_model(model):
        owner = layer_errors.owners(model, concrete, info)
    rows = []
    for op, _, outs in info.op_sequence:
        if op in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if not any(info.tensors[t].dtype in ("float32", "float16") for t in outs):
            continue
        layer = next((owner[t].name for t in outs if t in owner), None)
        if layer is None:
            found = _layers_of_tensors(model, info, {op})
            layer = found[0] if found else info.tensors[outs[0]].name
        row = {"layer": layer, "op": op}
        if row not in rows:
            rows.append(row)
    return rows


def auto_precision(c):
    """`precision="auto"`: raise the layers losing the most SQNR to int16 (or
    float32) while the worst layer is below the goal (`precision.auto`)."""
    if c.precision != "auto":
        return None
    from keras_microtune.export import layer_errors, precision

    model, concrete = c.converted_model, c.concrete
    x_eval = c.transform(c.val if c.val is not None else c.rep)
    order = [ly.name for ly in model.layers]

    def measure(tflite):
        info = _tflite.parse(tflite)
        return layer_errors.measure(model, concrete, tflite, info, x_eval)

    start = auto_float_layers(model, c.report.get("float_layers") or [])
    if start:  # Quantize those layers as float32 on purpose (whole layer).
        c.tflite = c.mixed.build(start)
        rows = measure(c.tflite)
    else:
        rows = c.report.get("layer_errors") or measure(c.tflite)
    choice, tflite, rows, steps = precision.auto(
        c.mixed, rows, measure, order, start=start
    )
    c.precision = choice
    c.tflite = tflite
    c.report["layer_errors"] = rows
    if c.target.is_mcu:
        c.report["float_layers"] = float_layers(model, concrete, c.info)
    return {
        "raised": choice,
        "steps": steps,
        "goal_sqnr_db": precision.AUTO_GOAL_DB,
        "worst_sqnr_db": rows[0]["sqnr_db"] if rows else None,
    }


# TFLite Micro's int8 SOFTMAX needs input_scale * 2**26 > 1 (its fixed-point
# multiplier must exceed one); below that the interpreter aborts in Prepare.
SOFTMAX_MIN_INPUT_SCALE = 2.0**-26


def check_softmax_scale(c):
    """TFLite Micro targets: refuse an int8 SOFTMAX whose input scale TFLite
    Micro aborts on (inputs almost constant on the calibration data)."""
    if not c.target.is_mcu or "SOFTMAX" not in c.info.ops:
        return None
    from ai_edge_litert.interpreter import Interpreter

    details = {
        d["index"]: d for d in Interpreter(model_content=c.tflite).get_tensor_details()
    }
    checked = 0
    for op, ins, _ in c.info.op_sequence:
        if op != "SOFTMAX" or details[ins[0]]["dtype"].__name__ != "int8":
            continue
        checked += 1
        scale = float(details[ins[0]]["quantization"][0])
        if scale * 2**26 <= 1:
            layers = _layers_of_tensors(c.converted_model, c.info, {"SOFTMAX"})
            layers = layers or [c.info.tensors[ins[0]].name]
            raise ValueError(
                f"The softmax input (layers {layers or 'unknown'}) has int8 scale "
                f"{scale:.3g}: its values span almost nothing on the calibration "
                f"data, and TFLite Micro's int8 SOFTMAX aborts below a scale of "
                f"{SOFTMAX_MIN_INPUT_SCALE:.3g}. The logits are (nearly) constant: "
                "check that the model is trained (a dead network outputs the same "
                "logits for every input) and that representative_data looks like "
                "the real inputs (same scaling). Or end the model with logits "
                "(no softmax) and apply softmax on the device."
            )
    return {"softmax_ops": checked}


def patch_inference(c):
    """`patch_inference=...`: compute the first stage patch by patch
    (`patch_inference.apply`; before `strip`, which drops the layer names it reads)."""
    spec = c.options.get("patch_inference")
    if spec is None:
        return None
    import keras

    from keras_microtune.optimize import graph

    model = c.converted_model
    # Layer names, nested models' included (tf_keras and SavedModels: their own).
    layers = graph.walk(model) if isinstance(model, keras.Model) else []
    names = [layer.name for layer in layers or getattr(model, "layers", [])]
    try:
        with cannot_run(c.info):
            tflite, report = patch_lib.apply(c.tflite, c.info, spec, names)
    except patching.PatchError as e:
        raise ValueError(f"patch_inference={spec}: {e}") from None
    if tflite is not c.tflite:
        c.tflite = tflite
    c.report["patch_inference"] = report
    keys = ("applied", "until", "grid", "arena_bytes_before", "arena_bytes_after")
    return {k: report[k] for k in keys if k in report}


def strip(c):
    """TFLite Micro targets: drop names, signatures and metadata (`_tflite.strip`).
    Trainable target: drop tensor names, keep the signatures, and share the
    frozen constants its `infer` and `train` subgraphs both hold."""
    if not (c.target.is_mcu or c.target.trainable):
        return None
    before = c.tflite
    trainable = c.target.trainable
    c.tflite = _tflite.strip(before, keep_signatures=trainable, share_buffers=trainable)
    c.report["stripped_bytes_saved"] = len(before) - len(c.tflite)
    return {}


def int8_frozen_weights(c):
    """Target `mobile-trainable-int8`: frozen weights of 1024+ values stored
    int8 with a DEQUANTIZE op (`int8_weights.apply`); what trains stays
    float32. The float32 file is kept for the exact train-step check."""
    if not (c.target.trainable and c.target.quantization == "dynamic"):
        return None
    from keras_microtune.export import int8_weights

    c.training["float_tflite"] = c.tflite
    tflite, summary = int8_weights.apply(c.tflite)
    c.tflite = tflite
    return summary


def compress(c):
    """`compression=...`: LUT weight compression, verified bit-exact in TFLite
    Micro (before the memory plan: compression adds tensors)."""
    bits = c.options["compression"]
    if bits is None:
        return None
    x_check = c.val if c.val is not None else c.rep
    c.uncompressed = (c.tflite, c.info)  # LiteRT parity runs on this one.
    tflite, info, report = compression_lib.apply(
        c.tflite, bits, c.transform(x_check), info=c.info
    )
    c.set_tflite(tflite, info)
    c.report["compression"] = report
    return {"requested": report["requested"], "tensors": len(report["tensors"])}


def memory_plan(c):
    """TFLite Micro targets without an NPU (Vela plans those): embed an offline
    memory plan when it lowers the measured arena (`memory_plan.apply`)."""
    if not c.target.is_mcu or c.target.accelerator:
        return None
    if c.stream and c.stream.form == "variables":
        return None  # Its resource variables' subgraph is not planned here.
    lower = _tflite.activation_lower_bound(c.info)
    with cannot_run(c.info):
        tflite, info, c.arena, c.memory = memory_plan_lib.apply(c.tflite, c.info, lower)
    c.set_tflite(tflite, info)
    did = {"offline_plan": c.memory["offline_plan"]}
    if "offline_plan_rejected" in c.memory:
        did["rejected"] = c.memory["offline_plan_rejected"]
    return did


def input_metadata(c):
    """A leading Rescaling/Normalization (`c.prep`): store how raw values are
    fed in the file itself, as its `keras_microtune.input` metadata entry.

    Last of the flatbuffer passes, so the entry goes into the final bytes.
    TFLite Micro ignores metadata it does not know: the arena `memory_plan`
    measured stands (`tests/export/test_input_metadata.py` checks it).
    """
    if c.prep is None:
        return None
    tflite, info = c.litert_model
    feed = preprocessing.describe_input(tflite, c.prep, info=info)
    before = len(c.tflite)
    c.tflite = input_metadata_lib.write(c.tflite, feed)
    return {
        "entry": input_metadata_lib.NAME,
        "version": input_metadata_lib.version_for(feed),
        "added_bytes": len(c.tflite) - before,
    }


def streaming_metadata(c):
    """`streaming=True`: say so in the file (`stream_metadata`), so that
    `kmt.evaluate` and `kmt.inspect` treat it as one frame per invoke."""
    if c.stream is None:
        return None
    before = len(c.tflite)
    c.tflite = stream_metadata_lib.write(c.tflite, c.stream.describe())
    c.report["streaming"] = stream_metadata_lib.read(c.tflite)
    return {
        "entry": stream_metadata_lib.NAME,
        "added_bytes": len(c.tflite) - before,
    }


@contextlib.contextmanager
def cannot_run(info):
    """Turn `runtimes.RuntimeFailure` into the ValueError `convert` raises."""
    try:
        yield
    except runtimes.RuntimeFailure as e:
        raise ValueError(
            f"TFLite Micro cannot run this model (ops: {info.ops}): {e}"
        ) from None


def check_ops(info, target, input_type=None, model=None, allowed=frozenset()):
    """Raise when `info` holds ops or I/O dtypes TFLite Micro int8 cannot run
    (`allowed`: forbidden ops this model may hold, e.g. `STATE_OPS`)."""
    bad = sorted(
        op
        for op in info.ops
        if (op in MCU_FORBIDDEN - set(allowed)) or op.startswith("CUSTOM")
    )
    float_io = [
        info.tensors[t].dtype
        for t in info.inputs + info.outputs
        if info.tensors[t].dtype not in {"int8", input_type}
    ]
    if bad or float_io:
        layers = _layers_of_tensors(model, info, set(bad)) if bad else []
        raise ValueError(
            f"The converted model cannot run on {target.name!r} (TFLite Micro, int8): "
            f"ops {bad} (layers {layers or 'unknown'}), non-int8 inputs/outputs "
            f"{float_io}. Replace these layers with ones that lower to TFLite "
            "Micro builtin ops (see `keras-microtune targets` and the README)."
        )


def _layers_of_tensors(model, info, ops: set) -> list[str]:
    """Model layer names found in the (unstripped) tensor names of `ops`."""
    names = {
        getattr(layer, "name", "")
        for layer in getattr(model, "layers", [])
        if getattr(layer, "name", "")
    }
    found = set()
    for op, ins, outs in info.op_sequence:
        if op not in ops:
            continue
        for t in ins + outs:
            parts = set(info.tensors[t].name.replace(";", "/").split("/"))
            found |= names & parts
    return sorted(found)
