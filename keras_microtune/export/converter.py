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

from keras_microtune.export import (
    backend_bridge,
    pipeline,
    preprocessing,
    streaming,
    trainable,
)
from keras_microtune.export import compression as compression_lib
from keras_microtune.export import patch_inference as patch_lib
from keras_microtune.export import precision as precision_lib
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
    """The TFLite converter: the traced model -> a flatbuffer for the target.

    With `precision=...`: calibrated once, quantized with the chosen layers
    in int16/float32 (`precision.Mixed`); `"auto"` starts from all-int8."""
    rep = c.transform(c.rep)
    if c.precision is not None:
        return _convert_mixed(c, rep)
    if c.stream:
        if c.target.quantization == "int8" and rep is None:
            raise ValueError(
                "streaming=True with an int8 target needs `representative_data` "
                "(whole sequences); quantization-aware training alone is not "
                "supported for streaming."
            )
        c.tflite = streaming.convert(c.stream, c.concrete, rep, c.target)
        return {
            "quantization": c.target.quantization,
            "calibration_sequences": 0
            if rep is None
            else len(streaming.calibration_sequences(c.stream, len(rep[0]))),
            "form": c.stream.form,
            "resource_variables": c.stream.describe()["state_variables"],
        }
    c.tflite = _tflite_convert(
        c.converted_model,
        c.concrete,
        c.target,
        rep,
        c.qat,
        c.options["verbose"],
        c.options["input_type"],
        constants=c.trace_constants,
        per_tensor_weights=c.options.get("weight_quantization") == "per_tensor",
    )
    return {
        "quantization": c.target.quantization,
        "calibration_samples": keras_level.calibration_samples(c),
    }


def convert_trainable(c):
    """Trainable target: the four signatures (`trainable.build_module`),
    gradients in builtin ops, converted with resource variables."""
    from keras_microtune.export import trainable

    c.tflite = trainable.to_tflite(trainable.build_module(c.training))
    return {"signatures": list(trainable.SIGNATURES)}


def _convert_mixed(c, rep):
    if c.qat or rep is None:
        raise ValueError(
            "`precision` applies to post-training quantization with "
            "`representative_data`; this model was trained with quantization-aware "
            "training (its ranges are fixed) or no calibration data was given. "
            "Pass representative_data, or precision=None."
        )
    try:
        c.mixed = precision_lib.Mixed(
            c.converted_model,
            c.concrete,
            _representative(rep, c.options["verbose"]),
            c.target,
        )
        choice = {} if c.precision == "auto" else c.precision
        c.tflite = c.mixed.build(choice)
    except ValueError:
        raise
    except Exception as e:  # ConverterError and friends.
        raise _conversion_error(e, c.converted_model, c.target) from None
    return {
        "quantization": c.target.quantization,
        "calibration_samples": keras_level.calibration_samples(c),
        "precision": c.precision,
    }


PASSES = (
    # Keras level (passes/keras_level.py): the model as Keras sees it.
    keras_level.load,
    keras_level.strip_pruning,
    keras_level.merge_adapters,
    keras_level.lower_recurrent,
    keras_level.plan_preprocessing,
    keras_level.plan_precision,
    keras_level.lower_for_micro,
    keras_level.trace,
    keras_level.detect_qat,
    keras_level.data_to_arrays,
    keras_level.lowering_error,
    # TFLite conversion (below).
    convert_to_tflite,
    # Flatbuffer passes (passes/flatbuffer.py): check and rewrite the .tflite.
    flatbuffer.check_mcu_ops,
    flatbuffer.check_softmax_scale,
    flatbuffer.check_full_int8,
    flatbuffer.per_tensor_weights,
    measurements.layer_errors,  # Before `strip`: it needs the tensor names.
    flatbuffer.auto_precision,
    flatbuffer.patch_inference,
    flatbuffer.strip,
    flatbuffer.compress,
    flatbuffer.memory_plan,
    flatbuffer.input_metadata,
    flatbuffer.streaming_metadata,
    # Measurements (passes/measurements.py): run it, assemble the report.
    measurements.arena,
    measurements.precision_costs,
    measurements.recurrent_cost,
    measurements.vela,
    measurements.parity,
    measurements.budget,
    measurements.describe,
    measurements.verify,
)

# Targets "mobile-trainable"(-int8) (export/trainable.py): no adapter merging,
# pruning strip or quantization of what trains (it stays as Keras trains it);
# tensor names are stripped, and -int8 stores the frozen weights in int8.
TRAINABLE_PASSES = (
    keras_level.load,
    keras_level.plan_training,
    keras_level.data_to_arrays,
    convert_trainable,
    flatbuffer.strip,
    flatbuffer.int8_frozen_weights,
    measurements.training_parity,
    measurements.training_report,
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
    precision: dict | str | None = None,
    patch_inference: str | dict | None = None,
    train_batch_size: int | None = None,
    streaming: bool = False,
    weight_quantization: str = "per_channel",
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
        precision: dict, `"auto"` or None. int8 targets: `{"layer name or
            regex": "int16" | "float32"}` computes those layers in 16x8 or
            float (QUANTIZE/DEQUANTIZE at their borders); a layer whose op
            TFLite Micro cannot run at that precision is refused before
            converting. `"auto"` raises the layers losing the most SQNR
            within 10% more flash. See `report["precision"]` and
            `report["precision_costs"]`. Defaults to `None` (all int8).
        patch_inference: `"auto"`, `{"until": layer, "grid": (rows, cols)}` or
            None. TFLite Micro targets: run the stage up to `until` patch by
            patch to cut the arena (`report["patch_inference"]`; README
            "Patch-based inference"). Defaults to `None`.
        streaming: bool. Convert a recurrent model (LSTM/GRU/SimpleRNN) to
            a one-step model: input one frame `(1, features)` per invoke, the
            state kept between invokes and zeroed by
            `MicroInterpreter::Reset()` (call it at each sequence start).
            Forward LSTMs keep it inside the fused int8
            UNIDIRECTIONAL_SEQUENCE_LSTM (h int8, c int16; `form "fused"`);
            other layers in TFLite resource variables, re-quantized to int8
            each frame (`"variables"`). After frame `t` the output is the
            full model's for frames `0..t`. Data are whole sequences, as for
            the model; parity compares per frame (`report["parity"]`), and
            the file says it streams (`report["streaming"]`, read back by
            `kmt.evaluate` and `kmt.inspect`). See
            `keras_microtune.export.streaming`. Defaults to `False`.
        train_batch_size: int or None. Target `"mobile-trainable"` only: the
            batch its `train` signature takes. Defaults to 16.
        weight_quantization: `"per_channel"` or `"per_tensor"`. TFLite Micro
            targets: `"per_tensor"` quantizes every int8 kernel with one scale
            (TFLite's converter without per-channel quantization), which
            drops the per-channel scales and zero points (12 B per output
            channel) and, on a model clustered per tensor
            (`cluster_weights(..., cluster_per_channel=False)`), lets
            `compression="lut4"` store each kernel with one 16-entry table.
            Costs accuracy where channels' ranges differ: check
            `report["parity"]`. The pass `per_tensor_weights` reports it
            (`report["weight_quantization"]`). Defaults to `"per_channel"`.

    Target `"mobile-trainable"` runs `TRAINABLE_PASSES` instead: a `.tflite`
    with signatures `infer`, `train`, `get_weights`, `set_weights` that
    trains `model.trainable_variables` with the compiled loss and optimizer
    (see `keras_microtune.export.trainable`); `report["training"]` says what
    trains and how one step in LiteRT compared with Keras.

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
    if train_batch_size is not None and not target.trainable:
        raise ValueError(
            "`train_batch_size` sets the batch of the train signature of target "
            f"'mobile-trainable'; target {target.name!r} has none. Received: "
            f"train_batch_size={train_batch_size!r}"
        )
    if output_dir is not None:  # Fail before the (slow) conversion.
        check_output_dir(output_dir, overwrite)
    options = {
        "representative_data": representative_data,
        "validation_data": validation_data,
        "compression": compression_lib.check(compression, target),
        "input_type": preprocessing.check_input_type(input_type, target),
        "precision": precision_lib.check(precision, target, input_type),
        "strict": strict,
        "safe_mode": safe_mode,
        "verbose": verbose,
        "patch_inference": patch_lib.check_option(patch_inference, target),
        # None off the trainable target: the backend bridge hands these
        # options to `convert` again, which refuses a batch there.
        "train_batch_size": (
            trainable.check_batch_size(train_batch_size) if target.trainable else None
        ),
        "streaming": _check_streaming(streaming),
        "weight_quantization": flatbuffer.check_weight_quantization(
            weight_quantization, target, precision
        ),
    }
    if backend_bridge.needed():  # JAX/PyTorch Keras: a TensorFlow child converts.
        result = backend_bridge.convert_elsewhere(model, target, options)
    else:
        passes = TRAINABLE_PASSES if target.trainable else PASSES
        c = pipeline.run(pipeline.Conversion(model, target, options), passes)
        c.report["passes"] = c.passes
        result = ConversionResult(c.tflite, c.report, str(c.name), timings=c.timings)
        result._parsed = (c.tflite, c.info)
    if output_dir is not None:
        result.save(output_dir, overwrite=overwrite)
    return result


def _check_streaming(streaming):
    if not isinstance(streaming, bool):
        raise TypeError(
            "Received an invalid value for `streaming`, expected True or False. "
            f"Received: streaming={streaming!r}"
        )
    return streaming


def _tflite_convert(
    model,
    concrete,
    target,
    rep,
    qat,
    verbose,
    input_type=None,
    constants=False,
    per_tensor_weights=False,
):
    import tensorflow as tf

    if constants:  # Weights already constants: the SavedModel path, which
        # keeps the fused-LSTM interface functions (`recurrent`).
        conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    else:
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
        if per_tensor_weights:  # `weight_quantization="per_tensor"`.
            conv._experimental_disable_per_channel = True
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
        raise _conversion_error(e, model, target) from None


def _conversion_error(e, model, target) -> ValueError:
    message = str(e)
    tf_ops = sorted(set(re.findall(r"'tf\.(\w+)'", message)))
    layers = keras_level.layers_with_ops(model, set(tf_ops))
    first = next((ln for ln in message.splitlines() if "rror" in ln), message)
    return ValueError(
        f"The model cannot be converted to builtin TFLite ops for target "
        f"{target.name!r}. Unsupported TensorFlow ops: {tf_ops or 'unknown'}; "
        f"layers involved: {layers or 'unknown'}. Replace these layers with "
        f"ones TFLite supports natively. Converter said: {first.strip()[:400]}"
    )


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
