"""Keras-level passes: the model as Keras sees it, before TFLite conversion.

Each pass takes the `pipeline.Conversion` and returns what it did (None: not
applicable). In order: `load`, `strip_pruning`, `merge_adapters`,
`lower_recurrent`, `plan_preprocessing`, `plan_precision`, `lower_for_micro`,
`trace`, `detect_qat`, `data_to_arrays`, `lowering_error`; for the
trainable target `load`, `plan_training`, `data_to_arrays`.
"""

from __future__ import annotations

import functools

import numpy as np

from keras_microtune import data as kmt_data
from keras_microtune.export import (
    _model,
    lowering,
    preprocessing,
    recurrent,
    streaming,
)

MAX_CALIBRATION = 1000  # Calibration samples the TFLite converter sees, at most.
LOWERING_SAMPLES = 64  # Samples the lowered float model is checked on.
_LOOP_OPS = {"While", "StatelessWhile"}


def load(c):
    """The model object (loaded from a path when given one) and its name."""
    c.source, c.name = _model.load(
        c.model, safe_mode=c.options["safe_mode"], compile=c.target.trainable
    )
    return {"model": str(c.name), "type": type(c.source).__name__}


def plan_training(c):
    """Trainable target: check the model trains on the device as in Keras
    (compiled loss and SGD/Adam, no random layers) and list what trains:
    exactly `model.trainable_variables`, nothing merged or stripped."""
    import keras

    from keras_microtune.export import trainable

    if not c.target.trainable:
        return None
    if not isinstance(c.source, keras.Model):
        raise ValueError(
            f"Target {c.target.name!r} exports a Keras 3 model's training step; "
            f"received {type(c.source).__name__}. Pass the keras.Model (e.g. from "
            "kmt.attach), compiled with its loss and optimizer."
        )
    c.training = trainable.plan(c.source, c.options["train_batch_size"])
    c.specs = _model.input_specs(c.source)
    summary = c.training["report"]
    return {
        "trained_variables": len(summary["variables"]),
        "trained_parameters": summary["trained_parameters"],
        "loss": summary["loss"],
        "optimizer": summary["optimizer"]["name"],
        "batch_size": summary["batch_size"],
    }


def strip_pruning(c):
    """A model still wrapped by `prune_low_magnitude` converts as it deploys,
    without the wrappers (their per-call mask assignment cannot be frozen into
    a flatbuffer); the zeros stay."""
    if not hasattr(c.source, "layers"):  # A SavedModel signature.
        return None
    from keras_microtune.optimize import prune

    stripped = prune.strip_pruning_for_quantization(c.source)
    c.pruning_stripped = stripped is not c.source
    c.source = stripped
    return {"pruning_wrappers_stripped": c.pruning_stripped}


def merge_adapters(c):
    """Fold adapters that are linear in a kernel (LoRA, MicroTune after a
    linear layer) into that kernel (`kmt.optimize.merge_adapters`), so the
    deployed model has the backbone's ops and size; the report lists each
    adapter, whether it merged, and why not."""
    import keras

    from keras_microtune.optimize import graph, merge

    if not isinstance(c.source, keras.Model) or not graph.is_graph_model(c.source):
        return None  # tf_keras, subclassed models and SavedModels: as they are.
    rows = merge.merge_report(c.source)
    if not rows:
        return None
    if any(row["merged"] for row in rows):
        c.source = merge.merge_adapters(c.source)
    return {"adapters": rows}


def lower_recurrent(c):
    """int8 and TFLite Micro targets: Keras LSTM/GRU/SimpleRNN/Bidirectional
    layers (a TensorFlow While loop) become what TFLite Micro runs: an LSTM
    the fused int8 UNIDIRECTIONAL_SEQUENCE_LSTM, other layers an unrolled
    graph (`recurrent.lower`). Float targets keep the loop."""
    import keras

    from keras_microtune.optimize import graph

    keras_graph = isinstance(c.source, keras.Model) and graph.is_graph_model(c.source)
    if c.options.get("streaming"):
        if not keras_graph:
            raise ValueError(
                "streaming=True needs a Keras 3 Functional or Sequential model. "
                f"Received: {type(c.source).__name__}."
            )
        c.stream = streaming.StepModel(c.source)
        did = {"streaming": c.stream.describe()}
        if c.stream.form == "fused":  # The LSTMs lower to the fused op.
            c.recurrent = did["layers"] = c.stream.lowered()[1]
        return did
    if c.target.quantization != "int8" and not c.target.is_mcu:
        return None
    if not keras_graph:
        return None  # tf_keras, subclassed models: `check_loops` still applies.
    c.source, rows = recurrent.lower(c.source)
    if not rows:
        return None
    c.recurrent = rows
    c.trace_constants = any(row["lowering"] == "fused" for row in rows)
    return {"layers": rows}


def plan_preprocessing(c):
    """Input specs, and how a leading Rescaling/Normalization is converted
    (`preprocessing.plan`: folded into the input quantization, or one op)."""
    c.specs = _model.input_specs(c.source)
    # A streaming model runs its preprocessing layers per frame, inside.
    c.prep = None if c.stream else preprocessing.plan(c.source, c.target)
    if c.prep is None:
        return {"preprocessing": None}
    return {"preprocessing": list(c.prep.affine.layers), "folded": c.prep.folded}


def lower_for_micro(c):
    """TFLite Micro targets: layers whose TFLite ops TFLite Micro cannot run
    in int8 (GELU, ELU/SELU/CELU, mish, ..., LayerNormalization's NEG) are
    traced as ops it has (`lowering.plan`); activations without such a form
    are refused here, naming the layer and a replacement."""
    if not c.target.is_mcu:
        return None
    c.lowerings = lowering.plan(c.converted_model)
    if not c.lowerings:
        return None
    return {"lowered": [low.record for low in c.lowerings]}


def plan_precision(c):
    """`precision=...`: the layers to keep out of int8, checked against the
    kernels TFLite Micro has, before converting (`precision.resolve`)."""
    import keras

    from keras_microtune.export import precision
    from keras_microtune.optimize import graph

    spec = c.options.get("precision")
    if spec is None:
        return None
    model = c.converted_model
    if not isinstance(model, keras.Model) or not graph.is_graph_model(model):
        raise ValueError(
            "`precision` needs a Keras 3 Sequential or Functional model (its "
            f"layers are named in the choice). Received: {type(model).__name__}"
        )
    c.precision = "auto" if spec == "auto" else precision.resolve(model, spec)
    return {"precision": c.precision}


def trace(c):
    """Trace the model to convert at batch 1 (with `c.lowerings` swapped in);
    refuse loops and unlowered activations the target cannot run."""
    if c.stream:  # One frame per call; the state persists between calls.
        c.concrete = streaming.trace(c.stream)
        check_loops(c.source, c.concrete, c.target)
        return {
            "inputs": [list(c.stream.frame_shape)],
            "per_invoke": "frame",
            "form": c.stream.form,
        }
    with lowering.applied(c.lowerings):
        c.concrete = _model.trace(c.converted_model, c.specs, c.trace_constants)
        check_loops(c.converted_model, c.concrete, c.target)
        if c.target.is_mcu:
            check_unlowered(c.converted_model, c.concrete, c.target)
    return {"inputs": [list(shape) for shape in c.shapes]}


def detect_qat(c):
    """Fake-quant ops in the graph mean quantization-aware training."""
    c.qat = _model.is_quantization_aware(c.concrete)
    return {"quantization_aware_training": c.qat}


def data_to_arrays(c):
    """Calibration and validation data as arrays; int8 needs calibration
    unless the model was trained with quantization-aware training."""
    rep, val = c.options["representative_data"], c.options["validation_data"]
    if rep is not None:
        c.rep, _ = kmt_data.as_arrays(rep, c.shapes, "representative_data")
    if val is not None:
        c.val, c.y_val = kmt_data.as_arrays(val, c.shapes, "validation_data")
    if c.target.quantization == "int8" and c.rep is None and not c.qat:
        raise ValueError(
            f"Target {c.target.name!r} quantizes to int8 and needs "
            "`representative_data` (a few hundred typical inputs) to calibrate, "
            "unless the model was trained with quantization-aware training "
            "(kmt.optimize.quantize_model)."
        )
    return {
        "calibration_samples": calibration_samples(c),
        "validation_samples": 0 if c.val is None else len(c.val[0]),
    }


def lowering_error(c):
    """Verify `lower_for_micro` in float: the model's outputs with the lowered
    forms against the model's own, on up to 64 validation (else calibration)
    inputs; `report["lowering"]` gets the figures."""
    if not c.lowerings:
        return None
    if c.rep is None:  # Only quantization-aware models get this far without.
        layers = [low.record["layer"] for low in c.lowerings]
        raise ValueError(
            f"Layers {layers} are lowered to ops TFLite Micro runs in int8, and "
            "the tensors between those ops have no quantization-aware ranges: "
            "without `representative_data` they would stay float (DEQUANTIZE/"
            "QUANTIZE around them). Pass `representative_data` (a few hundred "
            "typical inputs) to calibrate them."
        )
    data = c.val if c.val is not None else c.rep
    xs = c.transform([x[:LOWERING_SAMPLES] for x in data])
    reference = _model.predict(c.converted_model, xs)
    with lowering.applied(c.lowerings):
        lowered = _model.predict(c.converted_model, xs)
    error = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, lowered))
    did = {"samples": len(xs[0]), "outputs_max_abs_error": error}
    c.report["lowering"] = {"layers": [low.record for low in c.lowerings], **did}
    return did


def calibration_samples(c) -> int:
    """Samples the TFLite converter calibrates on."""
    return 0 if c.rep is None else min(len(c.rep[0]), MAX_CALIBRATION)


def check_loops(model, concrete, target):
    """Refuse graph loops (e.g. a recurrent layer) for int8 and TFLite Micro
    targets before converting: TFLite Micro cannot run WHILE, and TFLite's int8
    converter has been seen to crash the process on them."""
    if target.quantization != "int8" and not target.is_mcu:
        return
    loops = _LOOP_OPS & _model.graph_op_types(concrete)
    if not loops:
        return
    layers = layers_with_ops(model, loops)
    raise ValueError(
        f"Layers {layers or ['unknown']} hold a TensorFlow loop (ops "
        f"{sorted(loops)}, TFLite WHILE), which target {target.name!r} cannot "
        "run: TFLite Micro has no WHILE kernel and int8 conversion does not "
        "support it. Unroll recurrent layers (e.g. keras.layers.LSTM(..., "
        "unroll=True)) or use Conv1D layers; float targets ('float32') keep "
        "the loop."
    )


def check_unlowered(model, concrete, target):
    """Refuse activations TFLite Micro cannot run in int8 that `lower_for_micro`
    could not rewrite (in a Lambda or a custom layer's own code)."""
    found = lowering.unlowered(_model.graph_op_types(concrete))
    if not found:
        return
    layers = layers_with_ops(model, set(found))
    what = sorted({name for name, _ in found.values()})
    advice = "; ".join(sorted({f"for {name}: {tip}" for name, tip in found.values()}))
    raise ValueError(
        f"Layers {layers or ['unknown']} compute {what} (TensorFlow ops "
        f"{sorted(found)}), which target {target.name!r} cannot run: TFLite "
        f"Micro has no int8 kernel for the TFLite ops they become, and kmt "
        f"rewrites them only where they are a layer's activation. Instead, "
        f"{advice}."
    )


def layers_with_ops(model, tf_ops: set) -> list[str]:
    """Names of the model's layers whose traced graph holds one of `tf_ops`."""
    import tensorflow as tf

    found = []
    for layer in getattr(model, "layers", []) if tf_ops else []:
        try:
            inputs = layer.input if isinstance(layer.input, list) else [layer.input]
            specs = [tf.TensorSpec((1, *t.shape[1:]), t.dtype) for t in inputs]
            fn = tf.function(functools.partial(_call_layer, layer))
            graph_ops = _model.graph_op_types(fn.get_concrete_function(*specs))
        except Exception:  # Attribution is best effort; the error is raised anyway.
            continue
        if graph_ops & tf_ops:
            found.append(layer.name)
    return found


def _call_layer(layer, *args):
    return layer(args[0] if len(args) == 1 else list(args))
