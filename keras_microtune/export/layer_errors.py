"""Per-layer quantization error: each Keras layer's converted output vs float.

The converted model's tensors carry the TensorFlow name scopes the trace
opened: `"<model>/<layer scope>/<op>"`, several joined by `;` where the
converter fused ops (a Conv2D, its BatchNormalization and ReLU). Keras opens
each layer's scope twice per call (build, then call), so TensorFlow makes
the scope names unique: layer `dense` runs in scope `dense_1`, `dense_1` in
`dense_1_2`. `layer_scopes` reads the scopes the traced graph really holds
and assigns them to the model's layers; a tensor belongs to the latest
layer (in execution order) its fused name mentions, because a fused op
computes through all of them. The last tensor of a layer whose size matches
the layer's output is that layer's converted output.

`measure` runs the converted model in LiteRT's builtin kernels (no XNNPACK
delegate, which would hide the intermediate tensors; 5x faster than the
reference kernels TFLite Micro matches bit for bit, from which they differ
by a rounding step at most: `report["parity"]` measures that difference)
with every intermediate tensor kept (`experimental_preserve_all_tensors`),
dequantizes each layer's tensor
with its scale and zero point, and compares it with a Keras sub-model that
returns every layer's float output.
"""

from __future__ import annotations

import re

import numpy as np

from keras_microtune.export import _model, runtimes

MAX_SAMPLES = 32  # Samples each layer is compared on.
SQNR_CAP_DB = 100.0  # SQNR reported for an exact match (no noise).
_OUTPUT_NAME = re.compile(r"Identity(_?\d+)?(_int16)?$")


def _scope(layer) -> str:
    name = layer.name
    return name if _model._SCOPE.fullmatch(name) else _model._scope_name(name, False)


def layer_scopes(model, concrete) -> dict[str, object]:
    """Scope name -> top-level layer, from the scopes the traced graph holds.

    Layers are taken in order; each gets the earliest unassigned scope named
    after it (`name` or `name_<k>`), as TensorFlow numbers repeated scopes.
    """
    first_op = {}
    for index, op in enumerate(concrete.graph.get_operations()):
        parts = op.name.split("/")
        if len(parts) > 2:
            first_op.setdefault(parts[1], index)
    scopes = {}
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        pattern = re.compile(re.escape(_scope(layer)) + r"(_\d+)?")
        free = [s for s in first_op if s not in scopes and pattern.fullmatch(s)]
        if free:
            scopes[min(free, key=first_op.get)] = layer
    return scopes


def layer_outputs(model) -> dict[int, object]:
    """id(layer) -> its output KerasTensor in `model`'s own graph.

    A model cut out of another (a folded preprocessing layer removed) shares
    its layers, whose `layer.output` is the first model's tensor; the nodes
    of this model's graph give its own. Layers with several outputs, or
    called several times in the model, are left out.
    """
    from keras_microtune.optimize import graph

    return {
        key: node.output_tensors[0]
        for key, node in graph.layer_nodes(model).items()
        if len(node.output_tensors) == 1
    }


def owners(model, concrete, info) -> dict[int, object]:
    """Tensor index -> the layer whose output the tensor holds (the latest
    layer, in the model's order, that its fused name mentions)."""
    scopes = layer_scopes(model, concrete)
    order = {id(layer): k for k, layer in enumerate(model.layers)}
    out = {}
    for _, _, outs in info.op_sequence:
        for t in outs:
            layers = []
            for part in info.tensors[t].name.split(";") if t >= 0 else []:
                names = part.split("/")
                if len(names) > 1 and names[1] in scopes:
                    layers.append(scopes[names[1]])
            if layers:
                out[t] = max(layers, key=lambda layer: order[id(layer)])
            elif t >= 0 and _OUTPUT_NAME.match(info.tensors[t].name):
                layer = _output_layer(model, info, t)
                if layer is not None:
                    out[t] = layer
    return out


def map_tensors(model, concrete, info) -> list[tuple[object, int]]:
    """`(layer, tensor index)` for each layer whose converted output is found,
    in execution order of the converted model."""
    owner = owners(model, concrete, info)
    # A layer's own result, not its QUANTIZE/DEQUANTIZE'd copy at a border.
    produced = [
        t
        for op, _, outs in info.op_sequence
        if op not in ("QUANTIZE", "DEQUANTIZE")
        for t in outs
        if t >= 0
    ]
    outputs = layer_outputs(model)
    last = {}
    for t in produced:
        layer = owner.get(t)
        out = None if layer is None else outputs.get(id(layer))
        if out is not None and _size(info.tensors[t].shape) == _size(out.shape[1:]):
            last[id(layer)] = (layer, t)
    position = {t: k for k, t in enumerate(produced)}
    return sorted(last.values(), key=lambda pair: position[pair[1]])


def _output_layer(model, info, tensor):
    """The layer producing a model output tensor (single-output models)."""
    if len(model.outputs) != 1:
        return None
    outs = set(info.outputs)
    feeds_output = any(
        tensor in ins and set(o) & outs
        for op, ins, o in info.op_sequence
        if op in ("QUANTIZE", "DEQUANTIZE")
    )
    if tensor not in outs and not feeds_output:
        return None
    history = model.outputs[0]._keras_history
    return history.operation


def _size(shape) -> int:
    return int(np.prod([int(d) for d in shape if d is not None]))


def metrics(reference: np.ndarray, actual: np.ndarray) -> dict:
    """SQNR in dB (capped at `SQNR_CAP_DB`), cosine and max abs error."""
    ref = reference.reshape(-1).astype("float64")
    act = actual.reshape(-1).astype("float64")
    noise = float(np.sum((ref - act) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        sqnr = SQNR_CAP_DB
    elif signal == 0:
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = min(SQNR_CAP_DB, 10 * np.log10(signal / noise))
    denom = np.linalg.norm(ref) * np.linalg.norm(act)
    cosine = float(ref @ act / denom) if denom else float(noise == 0)
    return {
        "sqnr_db": round(float(sqnr), 3),
        "cosine": round(cosine, 6),
        "max_abs_error": float(np.abs(ref - act).max()) if ref.size else 0.0,
    }


def _run_all(tflite, xs, tensors):
    """Each kept tensor's values for every sample, dequantized to float."""
    ins, _ = runtimes.io_details(tflite)
    q = [runtimes.quantize(x, d) for x, d in zip(xs, ins)]
    values, details = runtimes.litert_tensors(tflite, q, tensors)
    return {t: runtimes.dequantize(values[t], details[t]) for t in tensors}


def measure(model, concrete, tflite, info, xs) -> list[dict]:
    """Per-layer error of `tflite` against `model` on inputs `xs`, worst first.

    Args:
        model: the Keras (Functional or Sequential) model that was traced.
        concrete: its traced function (`_model.trace`).
        tflite: bytes. The converted model, with tensor names (not stripped).
        info: `tflite` parsed (`_tflite.parse`).
        xs: list of input arrays, as the converted model takes them.

    Returns:
        A list of `{"layer", "sqnr_db", "cosine", "max_abs_error", "op",
        "dtype"}`, lowest SQNR first; `dtype` is the converted tensor's type.
    """
    import keras

    pairs = map_tensors(model, concrete, info)
    if not pairs:
        return []
    xs = [x[:MAX_SAMPLES] for x in xs]
    inputs = model.inputs if len(model.inputs) > 1 else model.inputs[0]
    outputs = layer_outputs(model)
    probe = keras.Model(inputs, [outputs[id(layer)] for layer, _ in pairs])
    expected = _model.predict(probe, xs)
    got = _run_all(tflite, xs, [t for _, t in pairs])
    producer = {t: op for op, _, outs in info.op_sequence for t in outs}
    rows = []
    for (layer, t), ref in zip(pairs, expected):
        row = {"layer": layer.name, **metrics(ref, got[t])}
        row["op"] = producer.get(t, "?")
        row["dtype"] = info.tensors[t].dtype
        rows.append(row)
    rows.sort(key=lambda row: (row["sqnr_db"], row["cosine"]))
    return rows
