"""evaluate(): metrics of a model measured on the runtime that will run it."""

from __future__ import annotations

import functools
import os

import keras
import numpy as np

from keras_microtune import data
from keras_microtune.export import (
    _model,
    input_metadata,
    preprocessing,
    stream_metadata,
)

RUNTIMES = ("tflm", "litert", "keras")
CLASSIFIER_METRICS = ("accuracy", "precision", "recall", "confusion_matrix")
REGRESSOR_METRICS = ("mean_abs_error", "root_mean_squared_error")
CHUNK = 256  # samples per TFLite Micro child process / progress-bar step
EVAL_ARENA_BYTES = 16 * 1024 * 1024  # generous: evaluation is not sizing


def _input_quantizer(model_or_tflite, tflite):
    """Raw input 0 -> the integers the device feeds, when the model says how.

    A ConversionResult reports it (`report["input"]`); a `.tflite` path or
    bytes carries it as its `keras_microtune.input` metadata (a folded
    Rescaling/Normalization). None: the input tensor's own quantization.
    """
    report = getattr(model_or_tflite, "report", None) or {}
    if "input" in report and hasattr(model_or_tflite, "quantize_input"):
        return model_or_tflite.quantize_input
    entry = input_metadata.read(tflite)
    if entry is None:
        return None
    return functools.partial(preprocessing.quantize_input, input_report=entry)


def _load_model(model_or_tflite):
    """Return ("keras", model) or ("tflite", bytes).

    "keras" covers every float source model `kmt.convert` accepts (Keras 3,
    tf_keras, a `.keras`/`.h5` path or a SavedModel folder).
    """
    if hasattr(model_or_tflite, "tflite"):  # a ConversionResult
        return "tflite", bytes(model_or_tflite.tflite)
    if isinstance(model_or_tflite, (bytes, bytearray, memoryview)):
        return "tflite", bytes(model_or_tflite)
    path = model_or_tflite
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".tflite"):
        with open(path, "rb") as f:
            return "tflite", f.read()
    return "keras", _model.load(model_or_tflite)[0]


# Ops that keep state from one invoke to the next.
_STATEFUL_OPS = {"VAR_HANDLE", "UNIDIRECTIONAL_SEQUENCE_LSTM"}


def _streaming(model_or_tflite, tflite):
    """`report["streaming"]` of a streaming model (`convert(streaming=True)`),
    from the ConversionResult or the file's metadata; None otherwise."""
    report = getattr(model_or_tflite, "report", None) or {}
    return report.get("streaming") or stream_metadata.read(tflite)


def _sequences_error(tflite, shapes, error):
    """A shape error for a model that keeps state but does not say it
    streams (no `keras_microtune.streaming` entry): name the way out."""
    from keras_microtune.export import _tflite

    stateful = _STATEFUL_OPS & set(_tflite.parse(tflite).ops)
    if not stateful:
        return error
    return ValueError(
        f"{error} The model holds {sorted(stateful)}, which keep state between "
        f"invokes, and takes inputs of shape {shapes[0]}: if it is a streaming "
        "model (one frame per invoke), this file does not say so (it has no "
        f"{stream_metadata.NAME!r} metadata). Evaluate the ConversionResult of "
        "kmt.convert(..., streaming=True), or convert the model again so the "
        "file carries the entry; evaluate then feeds whole sequences frame by "
        "frame."
    )


def _predict_stream(tflite, sequences, runtime, verbose, stream):
    """Each sequence fed one frame per invoke from a zero state: the outputs
    after the last frame `(N, ...)`, or after every frame `(N, T, ...)`."""
    from keras_microtune.export import runtimes

    ins, outs = runtimes.io_details(tflite)
    q = runtimes.quantize(sequences, ins[0])
    n = len(q)
    bar = keras.utils.Progbar(n, unit_name="sequence") if verbose else None
    chunks, size = [], max(1, CHUNK // max(1, q.shape[1]))
    for start in range(0, n, size):
        part = q[start : start + size]
        if runtime == "tflm":
            raw = runtimes.tflm_run(tflite, [part], EVAL_ARENA_BYTES, frames=True)[0]
        else:
            raw = runtimes.litert_stream(tflite, part)
        chunks.append(runtimes.dequantize(raw, outs[0]))
        if bar is not None:
            bar.update(min(n, start + size))
    steps = np.concatenate(chunks)
    return steps if stream["sequence_output"] else steps[:, -1]


def _predict_tflite(tflite, xs, runtime, verbose, input_quantizer=None):
    from keras_microtune.export import _tflite, runtimes

    info = _tflite.parse(tflite) if runtime == "tflm" else None  # Once, not per chunk.
    ins, outs = runtimes.io_details(tflite, info=info)
    raw_first = xs[0]
    xs = [runtimes.quantize(x, d) for x, d in zip(xs, ins)]
    if input_quantizer is not None:
        # The model says how raw values are fed (a folded Rescaling or
        # Normalization): quantize exactly as the device does.
        xs[0] = np.asarray(input_quantizer(raw_first)).astype(ins[0]["dtype"])
    n = len(xs[0])
    bar = keras.utils.Progbar(n, unit_name="sample") if verbose else None
    chunks = []
    for start in range(0, n, CHUNK):
        part = [x[start : start + CHUNK] for x in xs]
        if runtime == "tflm":
            raw = runtimes.tflm_run(tflite, part, EVAL_ARENA_BYTES, info=info)
        else:
            raw = runtimes.litert_run(tflite, part)
        chunks.append(runtimes.dequantize(raw[0], outs[0]))
        if bar is not None:
            bar.update(min(n, start + CHUNK))
    return np.concatenate(chunks)


def _is_classification(y, outputs):
    integer_labels = np.issubdtype(y.dtype, np.integer) and y.ndim == 1
    one_hot = (
        y.ndim == 2
        and y.shape[1] == outputs.shape[-1] > 1
        and set(np.unique(y)) <= {0, 1}
    )
    return integer_labels or one_hot


def _classifier_metrics(y, outputs):
    if y.ndim == 2:
        y = y.argmax(axis=1)
    y = y.astype("int64")
    if outputs.shape[-1] == 1:
        predicted = (outputs[:, 0] > 0.5).astype("int64")
        classes = 2
    else:
        predicted = outputs.reshape(len(outputs), -1).argmax(axis=1)
        classes = outputs.shape[-1]
    classes = max(classes, int(y.max()) + 1)
    confusion = np.zeros((classes, classes), "int64")
    np.add.at(confusion, (y, predicted), 1)
    hits = np.diag(confusion).astype("float64")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(hits / confusion.sum(axis=0))
        recall = np.nan_to_num(hits / confusion.sum(axis=1))
    return {
        "accuracy": float(hits.sum() / len(y)),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "confusion_matrix": confusion.tolist(),
    }


def _regressor_metrics(y, outputs):
    error = outputs.reshape(y.shape).astype("float64") - y
    return {
        "mean_abs_error": float(np.abs(error).mean()),
        "root_mean_squared_error": float(np.sqrt((error**2).mean())),
    }


def evaluate(model_or_tflite, x, y=None, runtime=None, metrics=None, verbose=0):
    """Metrics of a model on `(x, y)`, measured in the chosen runtime.

    Classifiers (integer or one-hot labels) get accuracy, per-class precision
    and recall, and the confusion matrix (rows: true class, columns:
    predicted); regressors get mean absolute error and RMSE. Quantized
    inputs and outputs are (de)quantized with the model's own parameters, so
    the same float `x` serves every runtime and the numbers compare side by
    side. When the model's leading Rescaling/Normalization was folded into its
    input quantization, `x` holds raw values and is quantized as the device
    does: by `result.quantize_input` for a ConversionResult, and by the
    file's `keras_microtune.input` metadata for a `.tflite` path or bytes.

    Args:
        model_or_tflite: keras.Model, ConversionResult, .tflite bytes, or a
            path to a `.tflite` or `.keras` file.
        x: inputs in any form `kmt.convert` accepts (array, `(x, y)`,
            tf.data.Dataset, generator, `.npz` path).
        y: labels or targets; taken from `x` when it carries them.
        runtime: str or None. `"tflm"` (TFLite Micro, in a child process),
            `"litert"` or `"keras"`. Defaults to `"keras"` for Keras models
            and `"tflm"` for .tflite models.
        metrics: sequence of str or None. Subset of the metric names to
            return; None returns all that apply.
        verbose: int. 1 shows a progress bar. Defaults to `0`.

    Returns:
        dict of metric name -> value, plus `runtime` and `samples`. A
        streaming model (`convert(..., streaming=True)`, known from the
        ConversionResult or the file's `keras_microtune.streaming` metadata)
        takes whole sequences in `x`: each is fed one frame per invoke from a
        reset state and scored by the output after its last frame (after
        every frame, with per-frame labels `(N, timesteps)`, when the model
        outputs per frame); `frames_per_sample` is added.

    Raises:
        ValueError: bad arguments (frames for a streaming model, whole
            sequences for a stateful one-frame model whose file does not say
            it streams), or a `.tflite` whose `keras_microtune.input`
            metadata has a version this keras_microtune does not read (it
            would feed raw values wrongly; the message says what to do).

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> x, y = np.eye(4, dtype="float32")[:3], np.array([0, 1, 2])
    >>> sorted(kmt.evaluate(model, x, y))[:2]
    ['accuracy', 'confusion_matrix']
    """
    kind, model = _load_model(model_or_tflite)
    if runtime is None:
        runtime = "keras" if kind == "keras" else "tflm"
    if runtime not in RUNTIMES:
        raise ValueError(
            f"Received an invalid value for `runtime`, expected one of {RUNTIMES}. "
            f"Received: runtime={runtime!r}"
        )
    if kind == "keras" and runtime != "keras":
        raise ValueError(
            f"runtime={runtime!r} runs a converted model; convert the Keras model "
            "first with kmt.convert(model, target=...) and evaluate result.tflite."
        )
    if kind == "tflite" and runtime == "keras":
        raise ValueError(
            "runtime='keras' needs a Keras model; use runtime='tflm' or 'litert' "
            "for a .tflite model."
        )
    stream = None
    if kind == "keras":
        shapes = [shape for shape, _ in _model.input_specs(model)]
    else:
        from keras_microtune.export import runtimes

        quantizer = _input_quantizer(model_or_tflite, model)  # Before the data.
        shapes = [
            tuple(int(n) for n in d["shape"][1:]) for d in runtimes.io_details(model)[0]
        ]
        stream = _streaming(model_or_tflite, model)
    try:
        xs, y_from_x = _arrays(x, shapes, stream)
    except ValueError as e:
        if kind == "keras" or stream is not None:
            raise
        raise _sequences_error(model, shapes, e) from None
    y = y_from_x if y is None else np.asarray(y)
    if y is None:
        raise ValueError("evaluate() needs labels: pass `y`, or `x` as an (x, y) pair.")
    if len(y) != len(xs[0]):
        raise ValueError(
            f"`x` has {len(xs[0])} samples but `y` has {len(y)}; they must match."
        )
    if kind == "keras":
        outputs = _model.predict(model, xs)[0]
    elif stream is not None:
        outputs = _predict_stream(model, xs[0], runtime, verbose, stream)
    else:
        outputs = _predict_tflite(model, xs, runtime, verbose, quantizer)
    outputs = outputs.astype("float32")
    sequences = len(y)
    if stream is not None and stream["sequence_output"]:
        # One output per frame: frame-level metrics, `y` per frame `(N, T)`.
        if y.shape[:2] != outputs.shape[:2]:
            raise ValueError(
                "This streaming model outputs after every frame, so `y` needs a "
                f"label per frame, shape {outputs.shape[:2]}; received {y.shape}."
            )
        outputs = outputs.reshape(-1, *outputs.shape[2:])
        y = y.reshape(-1, *y.shape[2:])
    if _is_classification(y, outputs):
        result, names = _classifier_metrics(y, outputs), CLASSIFIER_METRICS
    else:
        result, names = (
            _regressor_metrics(y.astype("float64"), outputs),
            REGRESSOR_METRICS,
        )
    if metrics is not None:
        unknown = sorted(set(metrics) - set(names))
        if unknown:
            raise ValueError(
                f"Received unknown metrics {unknown} for this model; available: "
                f"{list(names)}."
            )
        result = {k: result[k] for k in metrics}
    out = {**result, "runtime": runtime, "samples": int(sequences)}
    if stream is not None:
        out["frames_per_sample"] = int(stream["timesteps"])
    return out


def _arrays(x, shapes, stream):
    """`x` as arrays for the model's inputs: whole sequences `(timesteps,
    *frame)` for a streaming model, which refuses frames."""
    if stream is None:
        return data.as_arrays(x, shapes, what="x")
    sequence = (int(stream["timesteps"]), *stream["frame_shape"])
    shape = tuple(getattr(x, "shape", ()))
    try:
        if len(shape) == len(sequence) and shape[1:] == sequence[1:]:
            raise ValueError(f"`x` holds single frames, shape {shape}.")
        return data.as_arrays(x, [sequence], what="x")
    except ValueError as e:
        raise ValueError(
            f"{e} This is a streaming model (kmt.convert(..., streaming=True)): "
            f"evaluate takes whole sequences, shape (N, {', '.join(map(str, sequence))}"
            "), and feeds each one frame per invoke from a reset state, as the "
            "device does. Pass the sequences the Keras model takes, not single "
            "frames."
        ) from None
