"""Measurement passes: run the converted model and assemble the report.

Each pass takes the `pipeline.Conversion` and returns what it did (None: not
applicable); none rewrites the flatbuffer. In order: `arena`, `vela`,
`parity`, `budget` (also used by `kmt.inspect`), `describe`, `verify`.
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
from keras_microtune.export import memory_plan as memory_plan_lib
from keras_microtune.export import parity as parity_lib
from keras_microtune.export import report as report_lib
from keras_microtune.export.passes import keras_level
from keras_microtune.export.passes.flatbuffer import cannot_run
from keras_microtune.export.result import DoesNotFitError, VerificationError


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


def verify(c):
    """Verified when TFLite Micro agrees with LiteRT; `strict=True` raises
    when the model does not fit or is not verified."""
    c.report["verified"] = bool(c.report["parity"].get("tflm_within_tolerance", True))
    fits = bool(c.report["budget"]["fits"])
    if c.options["strict"] and not fits:
        raise DoesNotFitError(
            "The model does not fit: " + "; ".join(c.report["budget"]["problems"])
        )
    if c.options["strict"] and not c.report["verified"]:
        raise VerificationError(
            "TFLite Micro outputs differ from LiteRT's reference kernels: "
            f"{c.report['parity']}"
        )
    return {"verified": c.report["verified"], "fits": fits}
