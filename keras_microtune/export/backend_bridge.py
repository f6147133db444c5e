"""Convert from a JAX or PyTorch Keras process through a TensorFlow child.

TFLite's converter traces a TensorFlow graph, which a Keras model built on
another backend cannot give (`NotImplementedError` while tracing). So when
`kmt.convert` runs under `KERAS_BACKEND=jax` (or `torch`), `convert_elsewhere`
saves the model to a temporary `.keras` file (weights, QAT ranges, pruning
masks: every variable), the data to `.npz`, and runs the ordinary
conversion in a child Python with `KERAS_BACKEND=tensorflow`
(`_convert_worker.py`, run with `-m`). The child writes the `.tflite` and
the report; the parent returns them as a `ConversionResult`. The `.tflite`
bytes are those a TensorFlow-backend process converting the same weights
gets.

Errors the child raises (bad data, `strict=True` failures) are raised again
in the parent with the same type and message.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_ERRORS = ("ValueError", "TypeError", "FileNotFoundError")


def needed() -> bool:
    """True when this process's Keras backend cannot trace for TFLite."""
    import keras

    return keras.backend.backend() != "tensorflow"


def check_tensorflow(what: str = "kmt.convert") -> None:
    """Raise ImportError, saying how to fix it, when TensorFlow is missing."""
    import keras

    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            f"{what} converts with TensorFlow's TFLite converter. This process "
            f"runs Keras on the {keras.backend.backend()!r} backend, so the model "
            "is converted in a TensorFlow child process, but TensorFlow is not "
            "installed. Install it (`pip install 'tensorflow>=2.21,<2.22'`) next "
            "to your backend; training can stay on the current backend."
        )


def _input_shapes(model):
    return [tuple(t.shape[1:]) for t in model.inputs]


def _save_data(data, shapes, path, what):
    """Write `data` (any form `convert` takes) as arrays `in0..`, `y`; or keep
    a `.npz` path as it is. Returns the entry for the child's arguments."""
    from keras_microtune import data as kmt_data

    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)) and shapes is None:
        return {"path": os.path.abspath(os.fspath(data))}
    if shapes is None:  # A model path: the child knows the shapes.
        raise TypeError(
            f"Received an invalid value for `{what}` with a model path in a "
            "non-TensorFlow Keras process: expected a `.npz` path. Pass the "
            "loaded model, or the data as a `.npz` file."
        )
    xs, y = kmt_data.as_arrays(data, shapes, what)
    arrays = {f"in{i}": x for i, x in enumerate(xs)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    np.savez(path, **arrays)
    return {"arrays": path, "inputs": len(xs), "labels": y is not None}


def convert_elsewhere(model, target, options: dict):
    """`kmt.convert(model, target, **options)` run in a TensorFlow child.

    Args:
        model: keras.Model or a model path.
        target: the checked `Target`.
        options: `convert`'s keyword arguments except `output_dir` and
            `overwrite` (the parent saves).

    Returns:
        A `ConversionResult`.
    """
    import keras

    from keras_microtune.export.result import (
        ConversionResult,
        DoesNotFitError,
        VerificationError,
    )

    check_tensorflow()
    with tempfile.TemporaryDirectory(prefix="kmt_convert_") as tmp:
        if isinstance(model, (str, os.PathLike)):
            model_path, shapes = os.path.abspath(os.fspath(model)), None
        elif isinstance(model, keras.Model):
            model_path = os.path.join(tmp, f"{model.name}.keras")
            model.save(model_path)
            shapes = _input_shapes(model)
        else:
            raise TypeError(
                "Received an invalid value for `model`: on the "
                f"{keras.backend.backend()!r} backend kmt.convert takes a Keras 3 "
                "model or a model file path (it converts from the saved model in "
                f"a TensorFlow process). Received: {type(model).__name__}"
            )
        args = {
            "model": model_path,
            "target": dataclasses.asdict(target),
            "options": {
                k: v
                for k, v in options.items()
                if k not in ("representative_data", "validation_data")
            },
        }
        for what in ("representative_data", "validation_data"):
            path = os.path.join(tmp, f"{what}.npz")
            args[what] = _save_data(options[what], shapes, path, what)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(args, f)
        root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        env = {
            **os.environ,
            "KERAS_BACKEND": "tensorflow",
            "PYTHONPATH": os.pathsep.join(
                p for p in (root, os.environ.get("PYTHONPATH")) if p
            ),
        }
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.run(
            [sys.executable, "-m", "keras_microtune.export._convert_worker", tmp],
            env=env,
            stdout=None if options.get("verbose") else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        error_path = os.path.join(tmp, "error.json")
        if os.path.exists(error_path):
            with open(error_path) as f:
                error = json.load(f)
            types = {
                "DoesNotFitError": DoesNotFitError,
                "VerificationError": VerificationError,
                **{name: getattr(builtins, name) for name in _ERRORS},
            }
            raise types.get(error["type"], RuntimeError)(error["message"])
        if proc.returncode != 0 or not os.path.exists(os.path.join(tmp, "out.json")):
            raise RuntimeError(
                "The TensorFlow child process converting the model failed (exit "
                f"code {proc.returncode}). Its last output:\n{proc.stderr[-3000:]}"
            )
        with open(os.path.join(tmp, "out.json")) as f:
            out = json.load(f)
        with open(os.path.join(tmp, "model.tflite"), "rb") as f:
            tflite = f.read()
    return ConversionResult(tflite, out["report"], out["name"], timings=out["timings"])
