"""`kmt.convert`: Keras model -> verified TFLite for a named target.

The conversion is the pass list `PASSES`, run in order over one
`pipeline.Conversion` state; `report["passes"]` records each pass's name and
what it changed, `result.timings` its wall seconds. A new pass is one
function in the module of its stage (`passes.keras_level`,
`passes.flatbuffer`, `passes.measurements`) plus one entry in `PASSES`.
"""

from __future__ import annotations

import os
import re

from keras_microtune.export import backend_bridge, pipeline, preprocessing
from keras_microtune.export import compression as compression_lib
from keras_microtune.export import targets as targets_lib
from keras_microtune.export.passes import flatbuffer, keras_level, measurements
from keras_microtune.export.result import (  # noqa: F401 - import paths kept
    ConversionResult,
    DoesNotFitError,
    VerificationError,
    check_output_dir,
    save_files,
)

_check_mcu_ops = flatbuffer.check_ops  # Kept for callers of the old name.


def convert_to_tflite(c):
    """The TFLite converter: the traced model -> a flatbuffer for the target."""
    rep = c.transform(c.rep)
    c.tflite = _tflite_convert(
        c.converted_model,
        c.concrete,
        c.target,
        rep,
        c.qat,
        c.options["verbose"],
        c.options["input_type"],
    )
    return {
        "quantization": c.target.quantization,
        "calibration_samples": keras_level.calibration_samples(c),
    }


PASSES = (
    # Keras level (passes/keras_level.py): the model as Keras sees it.
    keras_level.load,
    keras_level.strip_pruning,
    keras_level.merge_adapters,
    keras_level.plan_preprocessing,
    keras_level.trace,
    keras_level.detect_qat,
    keras_level.data_to_arrays,
    # TFLite conversion (below).
    convert_to_tflite,
    # Flatbuffer passes (passes/flatbuffer.py): check and rewrite the .tflite.
    flatbuffer.check_mcu_ops,
    flatbuffer.strip,
    flatbuffer.compress,
    flatbuffer.memory_plan,
    flatbuffer.input_metadata,
    # Measurements (passes/measurements.py): run it, assemble the report.
    measurements.arena,
    measurements.vela,
    measurements.parity,
    measurements.budget,
    measurements.describe,
    measurements.verify,
)


def convert(
    model,
    target: str | targets_lib.Target = "mcu",
    representative_data=None,
    validation_data=None,
    output_dir: str | os.PathLike | None = None,
    compression: str | None = None,
    input_type: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    safe_mode: bool = True,
    verbose: int = 1,
) -> ConversionResult:
    """Convert a model for `target`, run it on the real runtimes, and measure it.

    Args:
        model: a Keras 3 model, a tf_keras model, or a path (`.keras`, `.h5`,
            SavedModel folder). A model still holding pruning wrappers is
            converted as `kmt.optimize.strip` leaves it (the zeros stay; see
            `report["conversion"]["pruning_wrappers_stripped"]`).
        target: str or Target. See `kmt.targets.available()`. Defaults to `"mcu"`.
        representative_data: calibration inputs (array, `(x, y)`, tf.data.Dataset,
            generator, or `.npz` path). Required for int8 targets unless the
            model was trained with quantization-aware training.
        validation_data: the same forms; parity against the float model is
            measured on it (else on calibration samples).
        output_dir: str or None. If given, `result.save(output_dir)` is called.
        compression: str or None. TFLite Micro targets only: `"lut1"` ...
            `"lut7"` stores every int8 weight tensor whose values fit
            `2**bits` per table (per output channel or per tensor) as bit
            indices into value tables; `"auto"` picks the fewest bits per
            tensor. Verified bit-exact in TFLite Micro; see
            `report["compression"]`. Only TFLite Micro built with
            `USE_TFLM_COMPRESSION=1` loads the result. Defaults to `None`.
        input_type: str or None. MCU targets only: dtype of the model input,
            `"int8"`, `"uint8"` (camera frames, 8-bit ADCs) or `"int16"`
            (TFLite's 16x8 mode: int16 activations and output, int8 weights).
            A leading `Rescaling`/`Normalization` is folded into the input
            quantization (see `result.report["input"]`), and the `.tflite`
            says so in its `keras_microtune.input` metadata (README:
            "Reading the input entry"). Defaults to the target's (`"int8"`).
        strict: bool. Raise instead of returning `fits=False` / unverified.
        overwrite: bool. Allow replacing a non-empty `output_dir`.
        safe_mode: bool. Keras safe deserialization for model files.
        verbose: int. 1 shows a calibration progress bar; 0 is silent.

    On the JAX or PyTorch Keras backend the model is saved to a temporary
    `.keras` file and converted by a TensorFlow child process
    (`export/backend_bridge.py`; TensorFlow must be installed): the same
    bytes as a TensorFlow-backend process gets from the same weights.

    Returns:
        A `ConversionResult`. `report["passes"]` lists the passes of
        `PASSES` that applied, in order, with what each changed
        (`bytes_before`/`bytes_after` where it rewrote the flatbuffer);
        `result.timings` gives their wall seconds.

    Example:
        >>> result = kmt.convert(model, "cortex-m4", representative_data=x_calib)
        >>> result.arena_bytes, result.fits
    """
    target = targets_lib.get(target)
    if output_dir is not None:  # Fail before the (slow) conversion.
        check_output_dir(output_dir, overwrite)
    options = {
        "representative_data": representative_data,
        "validation_data": validation_data,
        "compression": compression_lib.check(compression, target),
        "input_type": preprocessing.check_input_type(input_type, target),
        "strict": strict,
        "safe_mode": safe_mode,
        "verbose": verbose,
    }
    if backend_bridge.needed():  # JAX/PyTorch Keras: a TensorFlow child converts.
        result = backend_bridge.convert_elsewhere(model, target, options)
    else:
        c = pipeline.run(pipeline.Conversion(model, target, options), PASSES)
        c.report["passes"] = c.passes
        result = ConversionResult(c.tflite, c.report, str(c.name), timings=c.timings)
        result._parsed = (c.tflite, c.info)
    if output_dir is not None:
        result.save(output_dir, overwrite=overwrite)
    return result


def _tflite_convert(model, concrete, target, rep, qat, verbose, input_type=None):
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    conv.experimental_lower_to_saved_model = False  # Freezes variables.
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if target.quantization == "int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if rep is not None or not qat:
            # QAT without calibration data: TFLite checks for fake-quant ops only
            # with the generic op set; the MCU op check below still applies.
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if rep is not None:
            conv.representative_dataset = _representative(rep, verbose)
        if target.io_dtype == "int8":
            conv.inference_input_type = getattr(tf, input_type or "int8")
            conv.inference_output_type = tf.int16 if input_type == "int16" else tf.int8
            if input_type == "int16":  # TFLite's 16x8 mode: int16 activations.
                conv.target_spec.supported_ops = [
                    tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
                ]
    elif target.quantization == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif target.quantization == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        return conv.convert()
    except Exception as e:  # ConverterError and friends.
        message = str(e)
        tf_ops = sorted(set(re.findall(r"'tf\.(\w+)'", message)))
        layers = keras_level.layers_with_ops(model, set(tf_ops))
        first = next((ln for ln in message.splitlines() if "rror" in ln), message)
        raise ValueError(
            f"The model cannot be converted to builtin TFLite ops for target "
            f"{target.name!r}. Unsupported TensorFlow ops: {tf_ops or 'unknown'}; "
            f"layers involved: {layers or 'unknown'}. Replace these layers with "
            f"ones TFLite supports natively. Converter said: {first.strip()[:400]}"
        ) from None


def _representative(xs, verbose):
    def gen():
        import keras

        n = min(len(xs[0]), keras_level.MAX_CALIBRATION)
        bar = keras.utils.Progbar(n, unit_name="sample") if verbose else None
        for i in range(n):
            yield [x[i : i + 1] for x in xs]
            if bar:
                bar.update(i + 1)

    return gen
