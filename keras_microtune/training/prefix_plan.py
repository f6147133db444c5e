"""Find the frozen prefix of a Functional model that `fit` may compute once.

A layer call (a node of the model's graph) belongs to the prefix when its
layer has no trainable weights, computes the same outputs in training and in
inference, and all of its inputs come from the model's inputs or from other
prefix nodes. The *cut* is the set of prefix tensors that the rest of the
model (the trainable part) consumes; it may hold several tensors (a DAG cut),
including raw model inputs that a trainable layer reads directly.

`plan_prefix(model)` returns a `PrefixPlan` with the cut, a rough share of
the model's multiply-adds computed by the prefix, and the layers that ended
the prefix early (random or training-dependent layers), so the caller can
say why it does not cache.
"""

import dataclasses
import inspect

import keras
import numpy as np

from keras_microtune._api import sublayers
from keras_microtune.layers import EmbeddingStage, FeatureStage, MicroTune, OutputStage

# Layers whose `call` hands `training` only to their sublayers (checked
# themselves), so `training` does not change what these layers compute.
TRAINING_PASSTHROUGH = (
    keras.Model,
    FeatureStage,
    EmbeddingStage,
    MicroTune,
    OutputStage,
)
RANDOM_TYPES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


@dataclasses.dataclass
class PrefixPlan:
    """What `fit` can cache: the cut tensors and why the prefix ends there.

    Attributes:
        cut: list of KerasTensors. Prefix outputs the trainable part reads.
        layers: list of layers. The layers the prefix runs.
        fraction: float. The prefix's rough share of the model's
            multiply-adds (kernel sizes times output positions).
        stops: list of str. Frozen layers that ended the prefix, with why.
        reason: str or None. Why nothing can be cached (None when it can).
    """

    cut: list
    layers: list
    fraction: float
    stops: list
    reason: str | None = None


def _history(tensor):
    """(layer, node) that produced a symbolic tensor of the model graph."""
    # `_keras_history` names the producer of a KerasTensor (as in attach.py).
    layer, node_index, _ = tensor._keras_history
    return layer, layer._inbound_nodes[node_index]


def _takes_training(layer):
    return "training" in inspect.signature(layer.call).parameters


def training_dependence(layer):
    """Why `layer` may compute differently when training (None if it does not)."""
    for sub in sublayers(layer, include_self=True):
        kind = type(sub).__name__
        seeds = {id(v) for v in sub.variables} - {id(v) for v in sub.weights}
        if isinstance(sub, RANDOM_TYPES) or seeds:
            return f"{sub.name!r} ({kind}) is random in training"
        if type(sub).__module__.startswith("keras_microtune.optimize"):
            return (
                f"{sub.name!r} ({kind}) is a QAT/pruning/clustering layer whose "
                "state (ranges, folded BatchNorm statistics, masks) updates in "
                "training"
            )
        if isinstance(sub, keras.layers.BatchNormalization):
            if sub.trainable:
                return f"{sub.name!r} (BatchNormalization) uses batch statistics"
            continue
        if getattr(sub, "activity_regularizer", None) is not None:
            return f"{sub.name!r} ({kind}) adds an activity regularization loss"
        if not isinstance(sub, TRAINING_PASSTHROUGH) and _takes_training(sub):
            return f"{sub.name!r} ({kind}) takes a `training` argument"
    return None


def _macs(layer, node):
    """Kernel sizes times output positions: a rough multiply-add count."""
    positions = 1
    for tensor in node.output_tensors[:1]:
        positions = int(np.prod([d or 1 for d in tensor.shape[1:-1]]))
    kernels = [w for w in layer.weights if len(w.shape) >= 2]
    return sum(int(np.prod(w.shape)) for w in kernels) * positions


def plan_prefix(model):
    """The frozen prefix of Functional `model` (see the module docstring).

    Args:
        model: keras.Model. A Functional model.

    Returns:
        A `PrefixPlan`.
    """
    frozen = {}  # id(tensor) -> bool
    stops = []
    prefix_nodes = {}

    def is_frozen(tensor):
        key = id(tensor)
        if key not in frozen:
            layer, node = _history(tensor)
            if isinstance(layer, keras.layers.InputLayer):
                frozen[key] = True
            else:
                inputs_frozen = all(is_frozen(t) for t in node.input_tensors)
                ok = inputs_frozen and not any(v.trainable for v in layer.weights)
                if ok:
                    why = training_dependence(layer)
                    if why is not None:
                        stops.append(why)
                        ok = False
                if ok:
                    prefix_nodes[id(node)] = (layer, node)
                frozen[key] = ok
        return frozen[key]

    cut, seen, visited = [], set(), set()

    def collect(tensor):
        if id(tensor) in visited:
            return
        visited.add(id(tensor))
        if is_frozen(tensor):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                cut.append(tensor)
            return
        for parent in _history(tensor)[1].input_tensors:
            collect(parent)

    for output in model.outputs:
        if is_frozen(output):
            return PrefixPlan([], [], 0.0, stops, "a model output needs no training")
        collect(output)

    total = sum(_macs(*_history(t)) for t in _all_node_outputs(model))
    done = sum(_macs(layer, node) for layer, node in prefix_nodes.values())
    fraction = done / total if total else 0.0
    layers = list({id(lay): lay for lay, _ in prefix_nodes.values()}.values())
    plan = PrefixPlan(cut, layers, fraction, sorted(set(stops)))
    if not prefix_nodes:
        plan.reason = "no frozen layer precedes the first trainable layer"
    return plan


def _all_node_outputs(model):
    """One output tensor per layer call of the model graph (top level)."""
    found, stack, seen = [], list(model.outputs), set()
    while stack:
        tensor = stack.pop()
        layer, node = _history(tensor)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if not isinstance(layer, keras.layers.InputLayer):
            found.append(node.output_tensors[0])
            stack.extend(node.input_tensors)
    return found
