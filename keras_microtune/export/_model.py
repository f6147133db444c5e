"""Load a model from an object or a path and trace it at batch 1 for conversion."""

from __future__ import annotations

import contextlib
import json
import os
import re
import unicodedata

import numpy as np

_UNSAFE_LAYERS = ("Lambda",)


def load(model, safe_mode: bool = True, compile: bool = False):
    """Return `(callable model object, name)` from a model or a path.

    `compile=True` keeps a Keras file's compiled loss and optimizer (the
    trainable target trains with them).

    `.keras` files load with Keras' `safe_mode`; legacy `.h5` files holding a
    `Lambda` layer (marshalled Python code) are refused unless `safe_mode=False`.
    SavedModel directories use their `serving_default` signature.
    """
    if not isinstance(model, (str, os.PathLike)):
        if not callable(model):
            raise TypeError(
                "Received an invalid value for `model`, expected a Keras model, a "
                f"tf_keras model or a path. Received: {type(model).__name__}"
            )
        return model, getattr(model, "name", "model")
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such model file or directory: {path!r}")
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path!r} is a directory but not a SavedModel.")
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        if "serving_default" not in loaded.signatures:
            raise ValueError(f"SavedModel {path!r} has no 'serving_default' signature.")
        return _Signature(loaded), name
    import keras

    if path.endswith(".h5") or path.endswith(".hdf5"):
        _check_h5(path, safe_mode)
        return keras.saving.load_model(path, compile=compile), name
    if not path.endswith(".keras"):
        raise ValueError(
            f"Cannot load {path!r}: expected a .keras or .h5 file or a SavedModel "
            "directory."
        )
    _check_keras_file(path, safe_mode)
    try:
        model = keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
        return model, name
    except ValueError as e:
        if "safe_mode" in str(e) or "unsafe" in str(e).lower():
            raise ValueError(
                f"Refusing to load {path!r}: it contains a layer that needs unsafe "
                "deserialization (such as a Lambda layer), which can run arbitrary "
                "code. If you trust the file, pass safe_mode=False "
                f"(CLI: --unsafe-deserialization). Keras said: {e}"
            ) from None
        raise


def _unsafe_layers(config) -> list[str]:
    """Names of the layers in a Keras config that need unsafe deserialization:
    `Lambda` layers and layers holding a serialized Python lambda."""
    found = []

    def walk(node, layer):
        if isinstance(node, dict):
            inner = node.get("config")
            if "class_name" in node and isinstance(inner, dict):
                layer = str(inner.get("name", layer))
            if node.get("class_name") in _UNSAFE_LAYERS + ("__lambda__",):
                found.append(layer)
            for v in node.values():
                walk(v, layer)
        elif isinstance(node, list):
            for v in node:
                walk(v, layer)

    try:
        walk(config, "?")
    except RecursionError:
        raise ValueError("The model configuration is nested too deeply.") from None
    return sorted(set(found))


def _refuse(path, layers):
    raise ValueError(
        f"Refusing to load {path!r}: layer(s) {layers} need unsafe deserialization "
        "(a Lambda layer or a Python lambda holds code that runs when the model "
        "loads). If you trust the file, pass safe_mode=False "
        "(CLI: --unsafe-deserialization); better, replace the Lambda with a "
        "registered custom layer."
    )


_MAX_CONFIG_BYTES = 64 << 20


def _check_keras_file(path, safe_mode):
    """A `.keras` file is a zip archive; under safe_mode its config may name no
    Lambda layer (read as JSON, nothing is deserialized)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is not a valid .keras file: a .keras model is a zip archive "
            f"and this file ({os.path.getsize(path)} bytes) is not one. Save the "
            "model with model.save('model.keras')."
        )
    if not safe_mode:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entry = archive.getinfo("config.json")
            if entry.file_size > _MAX_CONFIG_BYTES:
                raise ValueError(f"{path!r}: config.json is {entry.file_size} bytes.")
            config = json.loads(archive.read(entry))
    except (KeyError, zipfile.BadZipFile, ValueError, RecursionError) as e:
        raise ValueError(
            f"{path!r} is not a valid .keras file (no readable config.json: {e}). "
            "Save the model with model.save('model.keras')."
        ) from None
    unsafe = _unsafe_layers(config)
    if unsafe:
        _refuse(path, unsafe)


def _check_h5(path, safe_mode):
    if not safe_mode:
        return
    import h5py

    try:
        with h5py.File(path, "r") as f:
            config = f.attrs.get("model_config")
    except OSError as e:
        raise ValueError(f"{path!r} is not a readable .h5 model: {e}") from None
    if config is None:
        raise ValueError(f"{path!r} holds no model configuration (weights only?).")
    if isinstance(config, bytes):
        config = config.decode("utf-8")
    try:
        config = json.loads(config)
    except (ValueError, RecursionError) as e:
        raise ValueError(
            f"{path!r} holds an unreadable model configuration: {e}"
        ) from None
    unsafe = _unsafe_layers(config)
    if unsafe:
        _refuse(path, unsafe)


class _Signature:
    """A SavedModel's serving signature, callable like a model on a list of inputs."""

    def __init__(self, loaded):
        self._loaded = loaded  # Keep the variables alive.
        self.signature = loaded.signatures["serving_default"]
        specs = self.signature.structured_input_signature[1]
        self.input_names = sorted(specs)
        self.input_specs = [specs[k] for k in self.input_names]
        self.name = "saved_model"

    def __call__(self, inputs, training=False):
        inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        out = self.signature(**dict(zip(self.input_names, inputs)))
        values = [out[k] for k in sorted(out)]
        return values[0] if len(values) == 1 else values


def input_specs(model) -> list:
    """Per-input `(shape without batch, dtype)` of a model."""
    if isinstance(model, _Signature):
        return [(tuple(s.shape[1:]), s.dtype.name) for s in model.input_specs]
    try:
        inputs = model.inputs
    except AttributeError:
        inputs = None
    if not inputs:
        raise ValueError(
            f"Model {getattr(model, 'name', '?')!r} has no defined inputs. Build it "
            "with keras.Input(shape=...) (or call it once on data) before converting."
        )
    out = []
    for x in inputs:
        shape = tuple(x.shape[1:])
        dtype = getattr(x.dtype, "name", x.dtype)
        out.append((shape, str(dtype)))
    return out


def trace(model, specs, constants: bool = False):
    """Trace the model at batch 1 with static shapes; return the concrete function.

    `constants=True` reads every Keras variable as a constant (a graph without
    variables, for TFLite's SavedModel conversion path; see `recurrent`).
    Raises a ValueError if a non-batch dimension is unknown (None), since TFLite
    Micro needs static shapes.
    """
    import tensorflow as tf

    tensor_specs = []
    for i, (shape, dtype) in enumerate(specs):
        if any(d is None for d in shape):
            raise ValueError(
                f"Input {i} has shape (None, {', '.join(map(str, shape))}): only the "
                "batch axis may be unknown. Give every other axis a size."
            )
        tensor_specs.append(tf.TensorSpec((1, *shape), dtype, name=f"input_{i}"))

    values = [(v, np.asarray(v)) for v in model.variables] if constants else None

    def call(*args):
        inputs = list(args) if len(args) > 1 else args[0]
        if not constants:
            return model(inputs, training=False)
        import keras

        mapping = [(v, tf.constant(value)) for v, value in values]
        with keras.StatelessScope(state_mapping=mapping):
            return model(inputs, training=False)

    with scope_names(model):
        return tf.function(call).get_concrete_function(*tensor_specs)


# TensorFlow's graph name scopes (what Keras opens per layer while tracing).
_ROOT_SCOPE = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")
_SCOPE = re.compile(r"[A-Za-z0-9_.\\/>-]*")


def _scope_name(name: str, root: bool) -> str:
    """`name` as TensorFlow accepts it: accents dropped, other characters `_`."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore")
    plain = re.sub(r"[^A-Za-z0-9_.-]", "_", ascii_name.decode("ascii"))
    return f"m{plain}" if root and not _ROOT_SCOPE.fullmatch(plain) else plain


@contextlib.contextmanager
def scope_names(model):
    """Rename, while tracing, the layers whose names TensorFlow's name scopes
    reject ("my model", "dense 1", "modèle"): Keras 3 accepts any name without
    "/", but a graph trace fails with "... is not a valid root scope name"
    (tf_keras refuses such names when the model is built). The names are
    restored afterwards; `result.name` and `g_model_name` keep the original."""
    flatten = getattr(model, "_flatten_layers", None)  # No layers: a SavedModel.
    renamed = []
    for layer in flatten(include_self=True, recursive=True) if flatten else []:
        root = layer is model
        if not (_ROOT_SCOPE if root else _SCOPE).fullmatch(layer.name):
            renamed.append((layer, layer.name))
            layer.name = _scope_name(layer.name, root)
    try:
        yield
    finally:
        for layer, name in renamed:
            layer.name = name


def graph_op_types(concrete) -> set[str]:
    """TensorFlow op types in a traced function, including nested functions."""
    types = {op.type for op in concrete.graph.get_operations()}
    for fn in concrete.graph.as_graph_def().library.function:
        types.update(node.op for node in fn.node_def)
    return types


def is_quantization_aware(concrete) -> bool:
    """True when the graph holds fake-quant ops (QAT): ranges are already known."""
    return any(t.startswith("FakeQuant") for t in graph_op_types(concrete))


def predict(model, xs: list[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
    """Float outputs of the source model, as a list (one array per output)."""
    outs = []
    for start in range(0, len(xs[0]), batch_size):
        batch = [x[start : start + batch_size] for x in xs]
        y = model(batch if len(batch) > 1 else batch[0], training=False)
        if isinstance(y, dict):
            y = [y[k] for k in sorted(y)]
        elif not isinstance(y, (list, tuple)):
            y = [y]
        outs.append([np.asarray(v) for v in y])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
