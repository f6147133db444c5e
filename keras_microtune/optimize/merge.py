"""merge_adapters(): fold adapters that are linear in a kernel into the kernel.

Keras LoRA (`layer.enable_lora`, also inside FeatureStage, EmbeddingStage
and OutputStage via their `lora_rank`, and inside QAT's `QuantizeConv`)
merges exactly: the layer's kernel becomes `W + (alpha / rank) * A @ B` and
its config loses `lora_rank`, so the merged model has the backbone's
weights, ops and size. `MicroTune` folds into the Dense/Conv layer before it
when nothing non-linear sits between them (`y = x + x M + b` on
`x = conv(u, W) + c` is `conv(u, W (I + M)) + c (I + M) + b`); anywhere else
it stays a layer, and `merge_report` says why.
"""

import keras
import numpy as np
from keras import ops

from keras_microtune._api import sublayers
from keras_microtune.layers import MicroTune
from keras_microtune.optimize import graph
from keras_microtune.optimize.quantize_conv import kind_of

FOLD_KINDS = ("conv", "dense")


def _strip_lora(config):
    """A copy of a (nested) layer config without LoRA settings."""
    if isinstance(config, dict):
        return {
            k: _strip_lora(v)
            for k, v in config.items()
            if k not in ("lora_rank", "lora_alpha")
        }
    if isinstance(config, list):
        return [_strip_lora(v) for v in config]
    return config


def _own_variables(layer):
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def _has_lora(layer):
    return any(
        getattr(x, "lora_enabled", False) for x in sublayers(layer, include_self=True)
    )


def _copy_merged(layer, fold=None):
    """A built copy of `layer` with LoRA merged (and `fold` applied)."""
    config = _strip_lora(layer.get_config())
    new = layer.__class__.from_config(config)
    new.build_from_config(layer.get_build_config())
    for old, fresh in zip(
        sublayers(layer, include_self=True), sublayers(new, include_self=True)
    ):
        values = {v.name: v for v in _own_variables(old)}
        for variable in _own_variables(fresh):
            if variable.name == "kernel" and getattr(old, "lora_enabled", False):
                value = old.kernel
                source = old._kernel
            else:
                value = source = values[variable.name]
            variable.assign(ops.cast(value, variable.dtype))
            variable.trainable = source.trainable
        fresh._trainable = old.trainable
    new._trainable = layer.trainable
    if fold is not None:
        _fold_into(new, fold)
    return new


def _microtune_matrix(adapter):
    """The dense map `I + M` and the bias `b` of a linear MicroTune."""
    blocks = []
    for i in range(adapter.groups):
        if adapter.rank is None:
            blocks.append(ops.convert_to_numpy(adapter.kernel[i]))
        else:
            down = ops.convert_to_numpy(adapter.kernel_down[i])
            blocks.append(down @ ops.convert_to_numpy(adapter.kernel_up[i]))
    g = blocks[0].shape[0]
    width = g * adapter.groups
    m = np.zeros((width, width), "float32")
    for i, block in enumerate(blocks):
        cols = slice(i * g, (i + 1) * g)
        # "concat": slice i maps slice i; "sum": every slice feeds slice i.
        rows = range(adapter.groups) if adapter.merge == "sum" else [i]
        for j in rows:
            m[j * g : (j + 1) * g, cols] = block
    bias = ops.convert_to_numpy(adapter.bias) if adapter.use_bias else 0.0
    return np.eye(width, dtype="float32") + m, bias


def _fold_into(layer, adapter):
    full, bias = _microtune_matrix(adapter)
    kernel = ops.convert_to_numpy(layer.kernel)
    layer.kernel.assign(kernel @ full)
    if layer.use_bias:
        layer.bias.assign(ops.convert_to_numpy(layer.bias) @ full + bias)


def _own_nodes(model, layer):
    """The nodes of `layer` in `model`'s graph (layers can be shared)."""
    # A built Sequential keeps its graph in the Functional model it wraps.
    graph_model = getattr(model, "_functional", None) or model
    own = set(graph_model._nodes)
    return [
        node
        for index, node in enumerate(layer._inbound_nodes)
        if f"{id(layer)}_ib-{index}" in own
    ]


def _consumers(model):
    result = {}
    for layer in model.layers:
        for node in _own_nodes(model, layer):
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation
                result.setdefault(id(producer), []).append(layer)
    return result


def _why_not(adapter, producer, consumers, outputs):
    """None when `adapter` folds into `producer`, else the reason."""
    name = getattr(producer, "name", None)
    if kind_of(producer) not in FOLD_KINDS:
        kind = type(producer).__name__
        return (
            f"its input comes from {name!r} ({kind}), not a Dense/Conv layer "
            "(a non-linearity or other op sits between the adapter and a kernel)"
        )
    if keras.activations.serialize(producer.activation) != "linear":
        return f"{name!r} applies an activation before the adapter"
    if adapter.activation is not keras.activations.linear:
        return "the adapter's branch has an activation"
    if len(consumers.get(id(producer), [])) != 1 or id(producer) in outputs:
        return f"{name!r} has other consumers besides the adapter"
    if getattr(producer, "groups", 1) != 1:
        return f"{name!r} is a grouped convolution"
    if adapter.use_bias and not producer.use_bias:
        return f"{name!r} has no bias to take the adapter's bias"
    return None


def _plan(model):
    """(rows, {id(producer): adapter}, {id(adapter)}) for one graph level."""
    consumers = _consumers(model)
    outputs = {id(t._keras_history.operation) for t in model.outputs}
    rows, folds, folded = [], {}, set()
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not isinstance(layer, MicroTune):
            rows += _plan(layer)[0]
            continue
        if isinstance(layer, MicroTune):
            if type(layer) is not MicroTune:
                reason = "quantized (QAT) MicroTune: its int8 branch stays a layer"
            elif len(_own_nodes(model, layer)) != 1:
                reason = "the adapter is used more than once"
            else:
                tensor = _own_nodes(model, layer)[0].input_tensors[0]
                producer = tensor._keras_history.operation
                reason = _why_not(layer, producer, consumers, outputs)
                if reason is None:
                    folds[id(producer)] = layer
                    folded.add(id(layer))
            rows.append(
                {
                    "layer": layer.name,
                    "form": "microtune",
                    "merged": reason is None,
                    "reason": reason or "folded into the preceding kernel",
                }
            )
        for inner in sublayers(layer, include_self=True):
            if getattr(inner, "lora_enabled", False):
                rows.append(
                    {
                        "layer": layer.name
                        if inner is layer
                        else f"{layer.name}/{inner.name}",
                        "form": "lora",
                        "merged": True,
                        "reason": f"W + ({inner.lora_alpha}/{inner.lora_rank}) A B",
                    }
                )
    return rows, folds, folded


def merge_report(model):
    """What `merge_adapters(model)` merges, and why the rest stays.

    Returns:
        list of dicts {"layer", "form" ("lora" or "microtune"), "merged",
        "reason"}, in layer order.
    """
    _check(model)
    return _plan(model)[0]


def _check(model):
    if not isinstance(model, keras.Model) or not graph.is_graph_model(model):
        raise TypeError(
            "merge_adapters() expects a Sequential or Functional keras.Model. "
            f"Received: model of type {type(model).__name__}"
        )


def _merge(model):
    _, folds, folded = _plan(model)
    skipped = set()

    def clone_function(layer):
        if isinstance(layer, keras.Model):
            return _merge(layer)
        if id(layer) in folds or _has_lora(layer):
            return _copy_merged(layer, folds.get(id(layer)))
        copy = layer.__class__.from_config(layer.get_config())
        if layer.built and layer.get_build_config() is not None:
            copy.build_from_config(layer.get_build_config())
            graph.copy_weights(layer, copy)
        copy.trainable = layer.trainable
        for source, target in zip(layer.weights, copy.weights):
            target.trainable = source.trainable
        if id(layer) in folded:
            skipped.add(id(copy))
        return copy

    if isinstance(model, keras.Sequential):
        layers = [clone_function(x) for x in model.layers if id(x) not in folded]
        inputs = keras.Input(
            batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype
        )
        return keras.Sequential([inputs, *layers], name=model.name)

    def call_function(layer, *args, **kwargs):
        if id(layer) in skipped:
            return args[0]
        return layer(*args, **kwargs)

    return keras.models.clone_model(
        model, clone_function=clone_function, call_function=call_function
    )


def merge_adapters(model):
    """A copy of `model` with every adapter that is linear in a kernel merged.

    LoRA updates (`enable_lora`, the stages' `lora_rank`, QAT-wrapped layers
    too) become part of their kernel, and a `MicroTune` directly after a
    Dense/Conv layer with a linear activation folds into that layer's kernel
    and bias. The result computes the same outputs (float rounding aside)
    with the backbone's layers and weights, so it converts to the
    backbone's op list and size. `model` is not modified. Adapters that
    cannot merge stay layers; `kmt.optimize.merge_report(model)` lists what
    merged and why the rest did not.

    Args:
        model: keras.Model. A Sequential or Functional model (e.g. from
            `kmt.attach` or `kmt.optimize.quantize_model`).

    Returns:
        A new keras.Model.

    Example:

    >>> import keras
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.layers[0].enable_lora(2)
    >>> merged = kmt.optimize.merge_adapters(model)
    >>> merged.layers[0].lora_enabled
    False
    """
    _check(model)
    return _merge(model)
