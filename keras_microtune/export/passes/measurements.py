"""Measurement passes: run the converted model and assemble the report.

Each pass takes the `pipeline.Conversion` and returns what it did (None: not
applicable); none rewrites the flatbuffer. In order: `layer_errors` (run
right after conversion, while the tensors still carry their names),
`arena`, `recurrent_cost`, `vela`, `parity`, `budget` (also used by
`kmt.inspect`), `describe`, `verify`; for the trainable target
`training_parity`, `training_report`, `verify`.
"""

from __future__ import annotations

import numpy as np

from keras_microtune.export import (
    _tflite,
    codegen,
    input_metadata,
    preprocessing,
    runtimes,
)
from keras_microtune.export import layer_errors as layer_errors_lib
from keras_microtune.export import memory_plan as memory_plan_lib
from keras_microtune.export import parity as parity_lib
from keras_microtune.export import report as report_lib
from keras_microtune.export.passes import keras_level
from keras_microtune.export.passes.flatbuffer import cannot_run
from keras_microtune.export.result import DoesNotFitError, VerificationError


def layer_errors(c):
    """int8 targets: each Keras layer's converted output against the float
    model's on validation data (else calibration data), worst first
    (`layer_errors.measure`). Runs before `strip`, which drops the tensor
    names that tie tensors to layers. Not for a streaming model: its data
    are sequences, its graph one frame (`parity` compares it per frame)."""
    import keras

    from keras_microtune.optimize import graph

    model = c.converted_model
    x_eval = c.val if c.val is not None else c.rep
    if c.target.quantization != "int8" or x_eval is None or c.stream:
        return None
    if not isinstance(model, keras.Model) or not graph.is_graph_model(model):
        return None  # tf_keras, subclassed models, SavedModels: no Keras 3 graph.
    rows = layer_errors_lib.measure(
        model, c.concrete, c.tflite, c.info, c.transform(x_eval)
    )
    c.report["layer_errors"] = rows
    return {
        "layers": len(rows),
        "samples": min(len(x_eval[0]), layer_errors_lib.MAX_SAMPLES),
        "worst": rows[0]["layer"] if rows else None,
    }


def arena(c):
    """TFLite Micro targets: the smallest tensor arena that runs the model
    (already measured when the `memory_plan` pass ran)."""
    if not c.target.is_mcu:
        return None
    if c.arena is not None:
        return {"arena_bytes": c.arena["arena_bytes"], "measured_in": "memory_plan"}
    lower = _tflite.activation_lower_bound(c.info)
    with cannot_run(c.info):
        c.arena = runtimes.measure_arena(c.tflite, lower, info=c.info)
    c.memory = {"offline_plan": memory_plan_lib.read(c.tflite) is not None}
    return {"arena_bytes": c.arena["arena_bytes"]}


def precision_costs(c):
    """`precision=...`: each layer's dtype, and the flash and arena the
    choice costs against the same model in all-int8 (`report["precision"]`,
    `report["precision_costs"]`)."""
    if c.mixed is None:
        return None
    from keras_microtune.export import layer_errors, precision

    model, choice = c.converted_model, c.precision or {}
    names = [ly.name for ly in model.layers if type(ly).__name__ != "InputLayer"]
    c.report["precision"] = {name: choice.get(name, "int8") for name in names}
    baseline = c.mixed.baseline
    base_info = _tflite.parse(baseline)
    arena_int8 = (c.arena or {}).get("arena_bytes")
    if c.target.is_mcu and choice:
        stripped = _tflite.strip(baseline)
        lower = _tflite.activation_lower_bound(base_info)
        with cannot_run(base_info):
            arena_int8 = runtimes.measure_arena(stripped, lower)["arena_bytes"]
    size_int8 = len(_tflite.strip(baseline)) if c.target.is_mcu else len(baseline)
    total = precision.costs(
        len(c.tflite), size_int8, (c.arena or {}).get("arena_bytes"), arena_int8
    )
    # Per layer: weight and activation bytes of its ops, mixed vs all-int8
    # (from the unstripped flatbuffers, whose tensor names give the layer).
    mixed_info = _tflite.parse(c.mixed.build(choice)) if choice else base_info

    def by_layer(info):
        owner = {
            t: ly.name for t, ly in layer_errors.owners(model, c.concrete, info).items()
        }
        return precision.layer_bytes(info, owner, lambda n: choice.get(n, "int8"))

    mixed_rows, base_rows = by_layer(mixed_info), by_layer(base_info)
    layers = {}
    for name, dtype in choice.items():
        now, before = mixed_rows.get(name), base_rows.get(name)
        if now is None or before is None:
            continue
        layers[name] = {
            "dtype": dtype,
            "weight_bytes_added": now["weight_bytes"] - before["weight_bytes"],
            "activation_bytes_added": now["activation_bytes"]
            - before["activation_bytes"],
        }
    c.report["precision_costs"] = {**total, "layers": layers}
    return {"layers": dict(choice), "size_added_bytes": total["size_added_bytes"]}


def recurrent_cost(c):
    """What the `lower_recurrent` choice costs: the flatbuffer bytes and the
    TFLite Micro arena of the converted model, next to each layer's lowering
    (also `report["recurrent"]`)."""
    if not c.recurrent:
        return None
    c.report["recurrent"] = {
        "layers": c.recurrent,
        "size_bytes": len(c.tflite),
        "arena_bytes": c.arena["arena_bytes"] if c.arena else None,
        "fused_lstm_ops": [op for op, _, _ in c.info.op_sequence].count(
            "UNIDIRECTIONAL_SEQUENCE_LSTM"
        ),
    }
    return {
        "lowering": {row["layer"]: row["lowering"] for row in c.recurrent},
        "size_bytes": c.report["recurrent"]["size_bytes"],
        "arena_bytes": c.report["recurrent"]["arena_bytes"],
    }


def vela(c):
    """NPU targets: compile with Arm's Vela for SRAM, flash, op split, cycles."""
    if not c.target.accelerator:
        return None
    from keras_microtune.export import vela as vela_lib

    c.vela = vela_lib.compile_model(c.tflite, c.target.accelerator)
    return {k: c.vela[k] for k in ("accelerator", "npu_ops", "cpu_ops")}


def parity(c):
    """The float model vs LiteRT, and (int8) TFLite Micro vs LiteRT's
    reference kernels, on validation data (else calibration, else random)."""
    x_eval, data = c.val, "validation_data"
    if x_eval is None:
        x_eval, data = c.rep, "representative_data"
    if x_eval is None:  # QAT without data: seeded random inputs in a typical range.
        rng = np.random.default_rng(0)
        x_eval = [rng.uniform(-1, 1, (8, *s)).astype("float32") for s in c.shapes]
        data = "random"
    tflite, info = c.litert_model
    arena_bytes = c.arena["arena_bytes"] if c.arena else None
    if c.uncompressed is not None:
        # The measured arena is the compressed model's, which may carry an
        # offline plan the uncompressed one lacks: size this run generously.
        arena_bytes = None
    if c.stream:
        result = parity_lib.measure_stream(
            c.stream, tflite, c.target, x_eval[0], c.y_val, arena_bytes, info=info
        )
        result["data"] = data
        c.report["parity"] = result
        return {"samples": result["samples"], "data": data, "per": "frame"}
    result = parity_lib.measure(
        c.float_model,
        tflite,
        c.target,
        c.transform(x_eval),
        c.y_val,
        arena_bytes,
        info=info,
    )
    result["data"] = data
    c.report["parity"] = result
    return {"samples": result["samples"], "data": data}


def budget(c):
    """Assemble the report (size, ops, memory, Vela) and check the target's
    RAM and flash budgets; entries earlier passes wrote are kept."""
    lower = _tflite.activation_lower_bound(c.info)
    base = report_lib.build(
        target=c.target,
        info=c.info,
        size_bytes=len(c.tflite),
        bytes_saved=0,
        arena=c.arena,
        lower_bound=lower,
        parity=c.report.get("parity"),
        vela=c.vela,
        conversion={"quantization": c.target.quantization},
        tensor_arena_size=codegen.arena_size(c.arena["arena_bytes"])
        if c.arena
        else None,
    )
    base["memory"].update(c.memory)
    c.report = {**base, **c.report}
    return {"fits": c.report["budget"]["fits"]}


def describe(c):
    """How the model was converted, and what the device must feed it."""
    input_type = c.options["input_type"]
    c.report["conversion"] = {
        "quantization": c.target.quantization,
        "io_dtype": c.target.io_dtype,
        "input_type": input_type or c.target.io_dtype,
        "quantization_aware_training": c.qat,
        "pruning_wrappers_stripped": c.pruning_stripped,
        "calibration_samples": keras_level.calibration_samples(c),
        "batch_size": 1,
    }
    # Read back from the file when it carries the entry (`input_metadata`).
    c.report["input"] = input_metadata.read(c.tflite, c.info)
    if c.report["input"] is None:
        tflite, info = c.litert_model
        c.report["input"] = preprocessing.describe_input(tflite, c.prep, info=info)
    return {"input": c.report["input"]["dtype"]}


def _training_batch(c):
    """A batch for the train-step check: validation (else calibration)
    inputs with their labels when given, else seeded random values."""
    p, rng = c.training, np.random.default_rng(0)
    n = p["batch_size"]
    x, y = (c.val, c.y_val) if c.val is not None else (c.rep, None)
    if x is not None:
        rows = np.arange(n) % len(x[0])
        x = np.asarray(x[0], "float32")[rows]
        y = None if y is None else np.asarray(y)[rows]
    else:
        x = rng.normal(size=(n, *c.shapes[0])).astype("float32")
    if y is None:
        width = int(p["model"].outputs[0].shape[-1])
        if p["label_dtype"] == "int32":
            y = rng.integers(0, width, (n, *p["label_shape"]))
        else:
            y = rng.uniform(0, 1, (n, *p["label_shape"]))
    return x, np.asarray(y).reshape(n, *p["label_shape"]).astype(p["label_dtype"])


def training_parity(c):
    """Trainable target: one `train` step, `infer`, and a `set_weights` /
    `get_weights` round trip in LiteRT's signature runners against the
    same step in Keras (on copies: the model is not changed)."""
    if c.training is None:
        return None
    from keras_microtune.export import trainable_check

    x, y = _training_batch(c)
    float_file = c.training.get("float_tflite", c.tflite)
    check = trainable_check.check_step(c.training, float_file, x, y)
    if float_file is not c.tflite:  # int8 frozen weights: measured, not exact.
        int8 = trainable_check.check_step(c.training, c.tflite, x, y)
        check["int8_weights"] = {
            k: int8[k]
            for k in (
                "loss_abs_error",
                "weights_max_abs_error",
                "infer_max_abs_error",
                "set_get_round_trip_exact",
            )
        }
        check["within_tolerance"] &= int8["set_get_round_trip_exact"]
    c.report["training_check"] = check
    return {k: check[k] for k in ("loss_abs_error", "weights_max_abs_error")}


def training_report(c):
    """Trainable target: the report (size, ops of every signature, what
    trains, the step check); LiteRT has no arena or RAM budget to measure."""
    if c.training is None:
        return None
    from keras_microtune.export import trainable_check

    by_signature = trainable_check.signature_ops(c.tflite)
    counts = {}
    for ops in by_signature.values():
        for op, n in ops.items():
            counts[op] = counts.get(op, 0) + n
    check = c.report.pop("training_check")
    infer_shape = [-1, *c.shapes[0]]
    base = report_lib.build(
        target=c.target,
        info=c.info,
        size_bytes=len(c.tflite),
        bytes_saved=c.report.get("stripped_bytes_saved", 0),
        arena=None,
        lower_bound=0,
        parity=None,
        vela=None,
        conversion={"quantization": c.target.quantization},
        tensor_arena_size=None,
    )
    base.update(
        ops=sorted(counts),
        op_counts=dict(sorted(counts.items())),
        inputs=[{"shape": infer_shape, "dtype": "float32"}],
        outputs=[
            {
                "shape": [-1, *c.training["model"].outputs[0].shape[1:]],
                "dtype": "float32",
            }
        ],
        parity={
            "samples": check["samples"],
            "max_abs_error": check["infer_max_abs_error"],
            "train_loss_abs_error": check["loss_abs_error"],
            "train_weights_max_abs_error": check["weights_max_abs_error"],
        },
        conversion={
            "quantization": c.target.quantization,
            "frozen_weights": "int8" if "float_tflite" in c.training else "float32",
            "io_dtype": "float32",
            "batch_size": c.training["batch_size"],
            "builtin_ops_only": True,
        },
        training={
            **c.training["report"],
            "ops_by_signature": by_signature,
            "check": check,
        },
    )
    c.report = {**base, **c.report}
    return {"ops": len(counts), "within_tolerance": check["within_tolerance"]}


def verify(c):
    """Verified when TFLite Micro agrees with LiteRT; `strict=True` raises
    when the model does not fit or is not verified."""
    c.report["verified"] = bool(
        c.report["parity"].get("tflm_within_tolerance", True)
    ) and bool(
        c.report.get("training", {}).get("check", {}).get("within_tolerance", True)
    )
    fits = bool(c.report["budget"]["fits"])
    if c.options["strict"] and not fits:
        raise DoesNotFitError(
            "The model does not fit: " + "; ".join(c.report["budget"]["problems"])
        )
    if c.options["strict"] and not c.report["verified"]:
        if "training" in c.report:
            raise VerificationError(
                "The exported train step differs from the same step in Keras: "
                f"{c.report['training']['check']}"
            )
        raise VerificationError(
            "TFLite Micro outputs differ from LiteRT's reference kernels: "
            f"{c.report['parity']}"
        )
    return {"verified": c.report["verified"], "fits": fits}
