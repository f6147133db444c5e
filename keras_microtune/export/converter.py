"""`kmt.convert`: Keras model -> verified TFLite for a named target."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile

import numpy as np

from keras_microtune import data as kmt_data
from keras_microtune.export import (
    _model,
    _tflite,
    codegen,
    memory_plan,
    parity,
    preprocessing,
    runtimes,
)
from keras_microtune.export import compression as compression_lib
from keras_microtune.export import report as report_lib
from keras_microtune.export import targets as targets_lib

# Ops that must never reach a microcontroller model.
_MCU_FORBIDDEN = {
    "VAR_HANDLE",
    "READ_VARIABLE",
    "ASSIGN_VARIABLE",
    "WHILE",
    "CALL_ONCE",
}
_MAX_CALIBRATION = 1000


class DoesNotFitError(RuntimeError):
    """`strict=True` and the model exceeds the target's RAM or flash."""


class VerificationError(RuntimeError):
    """`strict=True` and TFLite Micro disagrees with LiteRT's reference kernels."""


@dataclasses.dataclass
class ConversionResult:
    """A converted model, its measured figures and its report.

    Attributes:
        tflite: bytes. The model as deployed.
        report: dict. Everything measured (see `report.json`).
    """

    tflite: bytes
    report: dict
    name: str = "model"
    output_dir: str | None = None  # Real path of the last `save`.

    @property
    def size_bytes(self) -> int:
        return len(self.tflite)

    @property
    def arena_bytes(self) -> int | None:
        """Tensor arena measured in TFLite Micro (None for LiteRT targets)."""
        return self.report["memory"].get("arena_bytes")

    @property
    def ops(self) -> list[str]:
        return list(self.report["ops"])

    @property
    def parity(self) -> dict | None:
        return self.report["parity"]

    @property
    def fits(self) -> bool:
        return bool(self.report["budget"]["fits"])

    def quantize_input(self, x):
        """Raw inputs -> the integers the device feeds (see `report["input"]`)."""
        return preprocessing.quantize_input(x, self.report["input"])

    def files(self, history=None, evaluations=None, project=False) -> dict[str, bytes]:
        """The artifacts `save` writes, by file name (see `save`)."""
        from keras_microtune.export import artifacts

        out = {"model.tflite": self.tflite}
        if self.report["target"]["runtime"] == "tflm":
            generated = codegen.files(
                self.tflite,
                self.name,
                self.ops,
                self.arena_bytes,
                input_report=self.report.get("input"),
            )
            out.update({k: v.encode() for k, v in generated.items()})
        extra = artifacts.extra_files(self, history, evaluations, project)
        out.update(extra)
        out["report.json"] = json.dumps(self.report, indent=2).encode()
        plot_names = [name for name in extra if name.endswith(".png")]
        out["report.md"] = (
            report_lib.markdown(self.report) + artifacts.plots_section(plot_names)
        ).encode()
        return out

    def save(
        self,
        directory: str | os.PathLike,
        overwrite: bool = False,
        history: dict | None = None,
        evaluations: dict | None = None,
        project: bool = False,
    ) -> str:
        """Write the artifacts into `directory` atomically; return its real path.

        Always: `model.tflite`, `report.json`, `report.md`. TFLite Micro
        targets add `model_data.cc`/`.h`, `op_resolver.h` and `test_data.h`
        (a test input and TFLite Micro's output for it); `project=True` adds
        the application template (`main.cc`, `Makefile`, `README.md`). LiteRT
        targets add `mobile.md`. With matplotlib installed, PNG plots:
        `memory.png`, `flash.png`, and `training.png` / `confusion.png` when
        `history` (a Keras History dict) / `evaluations` (title ->
        `kmt.evaluate` result) are given.

        Files go to a temporary folder beside `directory` that is renamed into
        place at the end: on any failure the destination is left as it was.

        A symbolic link is resolved: the files go to the folder it points to,
        whose real path is returned and kept in `result.output_dir`.

        Raises:
            FileExistsError: `directory` exists, is not empty, and not `overwrite`.
            PermissionError: the location is not writable (nothing is written).
        """
        files = self.files(history, evaluations, project)
        self.output_dir = save_files(files, directory, overwrite)
        return self.output_dir


def check_output_dir(directory, overwrite: bool = False) -> str:
    """The real path `directory` resolves to; raise if saving there cannot work.

    Called by `convert` before converting, so a bad `output_dir` fails fast.
    """
    dest = os.path.realpath(os.fspath(directory))
    if os.path.exists(dest):
        if not os.path.isdir(dest):
            raise FileExistsError(
                f"Output path {dest!r} exists and is not a folder; choose a folder "
                "path for the output."
            )
        if os.listdir(dest) and not overwrite:
            raise FileExistsError(
                f"Output folder {dest!r} is not empty; pass overwrite=True "
                "(CLI: --overwrite) to replace it, or choose an empty folder."
            )
    parent = os.path.dirname(dest)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PermissionError(
            f"Cannot write the output folder {dest!r}: {parent!r} is not a writable "
            "folder. Choose an output folder you can write to."
        )
    return dest


def save_files(files: dict[str, bytes], directory, overwrite: bool = False) -> str:
    """Write `files` (name -> bytes) into `directory` atomically; return its
    real path. The destination is untouched on any failure or interrupt."""
    bad = [n for n in files if os.path.basename(n) != n or n in ("", ".", "..")]
    if bad:
        raise ValueError(f"Refusing to write outside the output folder: {bad}")
    dest = check_output_dir(directory, overwrite)
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".kmt_tmp_", dir=parent)
    except OSError as e:
        raise OSError(
            e.errno,
            f"Cannot write the output folder {dest!r}: {e.strerror} in {parent!r}. "
            "Choose an output folder you can write to.",
        ) from None
    backup = None
    try:
        for name, content in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content)
        if os.path.exists(dest):
            backup = tempfile.mkdtemp(prefix=".kmt_old_", dir=parent)
            os.rmdir(backup)
            os.rename(dest, backup)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup and not os.path.exists(dest):
            os.rename(backup, dest)
        raise
    if backup:
        shutil.rmtree(backup, ignore_errors=True)
    return dest


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
        layers = _layers_with_ops(model, set(tf_ops))
        first = next((ln for ln in message.splitlines() if "rror" in ln), message)
        raise ValueError(
            f"The model cannot be converted to builtin TFLite ops for target "
            f"{target.name!r}. Unsupported TensorFlow ops: {tf_ops or 'unknown'}; "
            f"layers involved: {layers or 'unknown'}. Replace these layers with "
            f"ones TFLite supports natively. Converter said: {first.strip()[:400]}"
        ) from None


def _layers_with_ops(model, tf_ops: set) -> list[str]:
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


def _representative(xs, verbose):
    def gen():
        import keras

        n = min(len(xs[0]), _MAX_CALIBRATION)
        bar = keras.utils.Progbar(n, unit_name="sample") if verbose else None
        for i in range(n):
            yield [x[i : i + 1] for x in xs]
            if bar:
                bar.update(i + 1)

    return gen


def _strip_pruning(model):
    """`(model, stripped)`: a model still wrapped by `prune_low_magnitude`
    converts as it deploys, without the wrappers (their per-call mask
    assignment cannot be frozen into a flatbuffer); the zeros stay."""
    if not hasattr(model, "layers"):  # A SavedModel signature.
        return model, False
    from keras_microtune.optimize import prune

    stripped = prune.strip_pruning_for_quantization(model)
    return stripped, stripped is not model


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
            quantization (see `result.report["input"]`). Defaults to the
            target's (`"int8"`).
        strict: bool. Raise instead of returning `fits=False` / unverified.
        overwrite: bool. Allow replacing a non-empty `output_dir`.
        safe_mode: bool. Keras safe deserialization for model files.
        verbose: int. 1 shows a calibration progress bar; 0 is silent.

    Returns:
        A `ConversionResult`.

    Example:
        >>> result = kmt.convert(model, "cortex-m4", representative_data=x_calib)
        >>> result.arena_bytes, result.fits
    """
    target = targets_lib.get(target)
    if output_dir is not None:  # Fail before the (slow) conversion.
        check_output_dir(output_dir, overwrite)
    bits = compression_lib.check(compression, target)
    input_type = preprocessing.check_input_type(input_type, target)
    source, name = _model.load(model, safe_mode=safe_mode)
    source, pruning_stripped = _strip_pruning(source)
    specs = _model.input_specs(source)
    shapes = [shape for shape, _ in specs]
    prep = preprocessing.plan(source, target)
    converted_model = prep.model if prep else source  # Raw-unit preprocessing.
    float_model = prep.model if prep and prep.folded else source
    concrete = _model.trace(converted_model, specs)
    _check_loops(converted_model, concrete, target)
    qat = _model.is_quantization_aware(concrete)
    rep = val = y_val = None
    if representative_data is not None:
        rep, _ = kmt_data.as_arrays(representative_data, shapes, "representative_data")
    if validation_data is not None:
        val, y_val = kmt_data.as_arrays(validation_data, shapes, "validation_data")
    if target.quantization == "int8" and rep is None and not qat:
        raise ValueError(
            f"Target {target.name!r} quantizes to int8 and needs "
            "`representative_data` (a few hundred typical inputs) to calibrate, "
            "unless the model was trained with quantization-aware training "
            "(kmt.optimize.quantize_model)."
        )
    converted = _tflite_convert(
        converted_model,
        concrete,
        target,
        prep.transform(rep) if prep else rep,
        qat,
        verbose,
        input_type,
    )
    tflite, saved = converted, 0
    info = _tflite.parse(tflite)
    if target.is_mcu:
        _check_mcu_ops(info, target, input_type, converted_model)
        tflite = _tflite.strip(converted)
        saved = len(converted) - len(tflite)
        info = _tflite.parse(tflite)
    plain, compressed = tflite, None  # LiteRT parity runs on the uncompressed one.
    if bits is not None:  # Before the memory plan: compression adds tensors.
        x_check = val if val is not None else rep
        if prep and x_check is not None:
            x_check = prep.transform(x_check)
        tflite, compressed = compression_lib.apply(tflite, bits, x_check)
        info = _tflite.parse(tflite)
    result = _measure(tflite, info, target, name, offline_plan=target.is_mcu)
    tflite = result.tflite  # With the offline memory plan when it helps.
    if compressed is not None:
        result.report["compression"] = compressed
    x_eval = val if val is not None else rep
    if x_eval is None:  # QAT without data: seeded random inputs in a typical range.
        rng = np.random.default_rng(0)
        x_eval = [rng.uniform(-1, 1, (8, *s)).astype("float32") for s in shapes]
    result.report["parity"] = parity.measure(
        float_model,
        tflite if compressed is None else plain,
        target,
        prep.transform(x_eval) if prep else x_eval,
        y_val,
        result.arena_bytes,
    )
    result.report["parity"]["data"] = (
        "validation_data"
        if val is not None
        else "representative_data"
        if rep is not None
        else "random"
    )
    result.report["conversion"] = {
        "quantization": target.quantization,
        "io_dtype": target.io_dtype,
        "input_type": input_type or target.io_dtype,
        "quantization_aware_training": qat,
        "pruning_wrappers_stripped": pruning_stripped,
        "calibration_samples": 0 if rep is None else min(len(rep[0]), _MAX_CALIBRATION),
        "batch_size": 1,
    }
    result.report["stripped_bytes_saved"] = saved
    result.report["input"] = preprocessing.describe_input(plain, prep)
    result.report["verified"] = bool(result.parity.get("tflm_within_tolerance", True))
    _enforce(result, strict)
    if output_dir is not None:
        result.save(output_dir, overwrite=overwrite)
    return result


_LOOP_OPS = {"While", "StatelessWhile"}


def _check_loops(model, concrete, target):
    """Refuse graph loops (e.g. a recurrent layer) for int8 and TFLite Micro
    targets before converting: TFLite Micro cannot run WHILE, and TFLite's int8
    converter has been seen to crash the process on them."""
    if target.quantization != "int8" and not target.is_mcu:
        return
    loops = _LOOP_OPS & _model.graph_op_types(concrete)
    if not loops:
        return
    layers = _layers_with_ops(model, loops)
    raise ValueError(
        f"Layers {layers or ['unknown']} hold a TensorFlow loop (ops "
        f"{sorted(loops)}, TFLite WHILE), which target {target.name!r} cannot "
        "run: TFLite Micro has no WHILE kernel and int8 conversion does not "
        "support it. Unroll recurrent layers (e.g. keras.layers.LSTM(..., "
        "unroll=True)) or use Conv1D layers; float targets ('float32') keep "
        "the loop."
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


def _check_mcu_ops(info, target, input_type=None, model=None):
    bad = sorted(
        op for op in info.ops if op in _MCU_FORBIDDEN or op.startswith("CUSTOM")
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


def _measure(tflite, info, target, name, offline_plan=False):
    """Arena (TFLM), Vela, lower bound and budgets -> a ConversionResult.

    With `offline_plan`, an offline memory plan is embedded when it lowers the
    measured arena (`memory_plan.apply`; not for NPU targets, Vela plans those).
    """
    lower = _tflite.activation_lower_bound(info)
    arena, plan_memory = None, {}
    if target.is_mcu:
        try:
            if offline_plan and not target.accelerator:
                tflite, arena, plan_memory = memory_plan.apply(tflite, info, lower)
            else:
                arena = runtimes.measure_arena(tflite, lower)
                plan_memory = {"offline_plan": memory_plan.read(tflite) is not None}
        except runtimes.RuntimeFailure as e:
            raise ValueError(
                f"TFLite Micro cannot run this model (ops: {info.ops}): {e}"
            ) from None
    vela = None
    if target.accelerator:
        from keras_microtune.export import vela as vela_lib

        vela = vela_lib.compile_model(tflite, target.accelerator)
    report = report_lib.build(
        target=target,
        info=info,
        size_bytes=len(tflite),
        bytes_saved=0,
        arena=arena,
        lower_bound=lower,
        parity=None,
        vela=vela,
        conversion={"quantization": target.quantization},
        tensor_arena_size=codegen.arena_size(arena["arena_bytes"]) if arena else None,
    )
    report["memory"].update(plan_memory)
    return ConversionResult(tflite=tflite, report=report, name=str(name))


def _enforce(result, strict):
    if not strict:
        return
    if not result.fits:
        raise DoesNotFitError(
            "The model does not fit: " + "; ".join(result.report["budget"]["problems"])
        )
    if not result.report["verified"]:
        raise VerificationError(
            "TFLite Micro outputs differ from LiteRT's reference kernels: "
            f"{result.parity}"
        )
