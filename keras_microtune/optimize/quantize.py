"""quantize_model(): Keras 3 quantization-aware training that converts to int8.

`QUANTIZE_REGISTRY` is the declarative table of what happens to each layer
type. Categories:

- `"conv"`: wrapped in `QuantizeConv` (int8 weights, per channel for
  convolutions, per tensor for Dense/FULLY_CONNECTED); a BatchNormalization
  consuming only its output is folded in and a following ReLU/ReLU6 fused.
- `"requantize"`: the layer computes new values; its output gets an
  `ActivationQuantizer` (moving-average int8 range).
- `"passthrough"`: int8 in, same scale out (pooling, reshapes, dropout).
- `"fixed"`: TFLite fixes the int8 output scale (softmax, sigmoid, tanh).
- `"stage"`: a keras_microtune stage, rewritten by `quantize_stages`.
- `"norm"`: a last-axis LayerNormalization, wrapped in `QuantizeLayerNorm`
  (fake quantizers on the inner tensors of the int8 form `kmt.convert`
  lowers it to); any other LayerNormalization is unsupported.

Model inputs get an `ActivationQuantizer`, except where a leading
Rescaling/Normalization folds into the converted model's input quantization
(`optimize.affine`): the device's int8 input is then that preprocessing's
output, which is what gets the quantizer.

Hooks for schedules live in `optimize/hooks.py`.
"""

import keras

from keras_microtune.layers import EmbeddingStage, FeatureStage, MicroTune, OutputStage
from keras_microtune.optimize import cluster, graph, prune, tfmot_bridge
from keras_microtune.optimize import quantize_stages as stages
from keras_microtune.optimize.affine import leading_affine
from keras_microtune.optimize.graph import clone_layer
from keras_microtune.optimize.quantize_conv import kind_of
from keras_microtune.optimize.quantize_norm import QuantizeLayerNorm, supports
from keras_microtune.optimize.quantizers import (
    ActivationQuantizer,
)

L = keras.layers
QUANTIZE_REGISTRY = {
    L.Dense: "conv",
    L.Conv1D: "conv",
    L.Conv2D: "conv",
    L.DepthwiseConv1D: "conv",
    L.DepthwiseConv2D: "conv",
    L.SeparableConv1D: "conv",
    L.SeparableConv2D: "conv",
    L.Add: "requantize",
    L.Subtract: "requantize",
    L.Multiply: "requantize",
    L.Average: "requantize",
    L.Concatenate: "requantize",
    L.ReLU: "requantize",
    L.GlobalAveragePooling1D: "requantize",
    L.GlobalAveragePooling2D: "requantize",
    L.MaxPooling1D: "passthrough",
    L.MaxPooling2D: "passthrough",
    L.AveragePooling1D: "passthrough",
    L.AveragePooling2D: "passthrough",
    L.GlobalMaxPooling1D: "passthrough",
    L.GlobalMaxPooling2D: "passthrough",
    L.Reshape: "passthrough",
    L.Flatten: "passthrough",
    L.Dropout: "passthrough",
    L.SpatialDropout1D: "passthrough",
    L.SpatialDropout2D: "passthrough",
    L.Identity: "passthrough",
    L.ZeroPadding1D: "passthrough",
    L.ZeroPadding2D: "passthrough",
    L.Softmax: "fixed",
    L.LayerNormalization: "norm",
    FeatureStage: "stage",
    EmbeddingStage: "stage",
    OutputStage: "stage",
    MicroTune: "stage",
}
ACTIVATION_CATEGORIES = {
    "relu": "requantize",
    "relu6": "requantize",
    "linear": "passthrough",
    "softmax": "fixed",
    "sigmoid": "fixed",
    "tanh": "fixed",
}
STAGE_REWRITES = {
    FeatureStage: stages.feature_stage,
    EmbeddingStage: stages.embedding_stage,
    OutputStage: stages.output_stage,
    MicroTune: stages.microtune,
}
UNSUPPORTED_POLICIES = ("raise", "float")


def category_of(layer):
    """The registry category of a layer instance, or None if unsupported."""
    if isinstance(layer, keras.layers.Activation):
        return ACTIVATION_CATEGORIES.get(keras.activations.serialize(layer.activation))
    for cls in type(layer).__mro__:
        if cls in QUANTIZE_REGISTRY:
            return QUANTIZE_REGISTRY[cls]
    return None


def _unsupported_error(layer):
    if isinstance(layer, keras.layers.BatchNormalization):
        return ValueError(
            f"quantize_model() cannot fold BatchNormalization layer {layer.name!r}: "
            "it does not directly follow a Conv, DepthwiseConv, SeparableConv or "
            "Dense layer whose only consumer it is, and TFLite Micro has no int8 "
            "kernel for a standalone BatchNormalization. Move it right after a "
            "convolution, remove it, or pass unsupported='float' to keep it in "
            "float (the converter then adds QUANTIZE/DEQUANTIZE around it)."
        )
    supported = sorted({cls.__name__ for cls in QUANTIZE_REGISTRY})
    return ValueError(
        f"quantize_model() does not support layer {layer.name!r} of type "
        f"{type(layer).__name__}. Replace it with a supported layer ({supported}), "
        "move it out of the model (e.g. do rescaling in the data pipeline), or "
        "pass unsupported='float' to leave it in float with int8 fake "
        "quantization on its output (the converter then produces int8 only if "
        "TFLite has an int8 kernel for it)."
    )


def _consumers(model):
    """Map id(layer) -> list of layers of `model` that consume its output."""
    own = set(model._nodes)
    result = {}
    for layer in model.layers:
        for index, node in enumerate(layer._inbound_nodes):
            if f"{id(layer)}_ib-{index}" not in own:
                continue
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation
                result.setdefault(id(producer), []).append(layer)
    return result


def _plan_fusions(model):
    """conv id -> (batch_norm, activation name), plus ids of absorbed layers."""
    consumers = _consumers(model)
    outputs = {id(t._keras_history.operation) for t in model.outputs}
    plan, absorbed = {}, set()
    for layer in model.layers:
        if kind_of(layer) is None or len(layer._inbound_nodes) != 1:
            continue
        bn = act = None
        tail = layer
        nxt = consumers.get(id(tail), [])
        if (
            len(nxt) == 1
            and isinstance(nxt[0], keras.layers.BatchNormalization)
            and id(tail) not in outputs
            and stages.relu_max_value(layer) is False
            and keras.activations.serialize(layer.activation) == "linear"
        ):
            bn = tail = nxt[0]
        nxt = consumers.get(id(tail), [])
        own_activation = keras.activations.serialize(layer.activation)
        if (
            len(nxt) == 1
            and stages.fused_activation(nxt[0])
            and id(tail) not in outputs
            and (bn is not None or own_activation == "linear")
        ):
            act = nxt[0]
        plan[id(layer)] = (bn, None if act is None else stages.fused_activation(act))
        absorbed.update(id(x) for x in (bn, act) if x is not None)
    return plan, absorbed


def _folded_preprocessing(model):
    """Names of the leading Rescaling/Normalization layers `kmt.convert` folds
    into the input quantization for TFLite Micro (none if it does not)."""
    affine, _ = leading_affine(model)
    return affine.layers if affine is not None and affine.folds else []


def _quantize_graph(model, unsupported, sparse, quantize_inputs):
    plan, absorbed = _plan_fusions(model)
    built, quantized_inputs = {}, {}
    # A folded preprocessing runs on the host in raw units: the device's int8
    # input is its output, so that is what is fake-quantized (one scale for
    # the normalized tensor, not one for raw channels in different units).
    folded = _folded_preprocessing(model) if quantize_inputs else []

    def quantize_input(tensor):
        history = getattr(tensor, "_keras_history", None)
        if history is None or not isinstance(
            history.operation, keras.layers.InputLayer
        ):
            return tensor
        if id(tensor) not in quantized_inputs:
            name = history.operation.name
            if name.startswith("keras_tensor"):
                name = "input"
            layer = ActivationQuantizer(name=f"{name}_quantizer")
            quantized_inputs[id(tensor)] = layer(tensor)
        return quantized_inputs[id(tensor)]

    def fresh(layer, args, kwargs):
        """`layer` called through its own copy (the model keeps the original)."""
        if id(layer) not in built:
            # Built by its first call, so layers whose build takes more than
            # the first input's shape (MultiHeadAttention) clone too.
            built[id(layer)] = layer.__class__.from_config(layer.get_config())
            out = built[id(layer)](*args, **kwargs)
            graph.copy_weights(layer, built[id(layer)])
            built[id(layer)].trainable = layer.trainable
            return out
        return built[id(layer)](*args, **kwargs)

    def call_function(layer, *args, **kwargs):
        if getattr(layer, "name", None) in folded:
            out = fresh(layer, args, kwargs)
            if layer.name != folded[-1]:
                return out
            return ActivationQuantizer(name=f"{layer.name}_quantizer")(out)
        if quantize_inputs:
            args = keras.tree.map_structure(quantize_input, args)
        if id(layer) in absorbed:
            return args[0]
        if isinstance(layer, keras.Model):
            if id(layer) not in built:
                built[id(layer)] = _quantize(layer, unsupported, sparse, False)
            return built[id(layer)](*args, **kwargs)
        if not isinstance(layer, keras.layers.Layer):
            return layer(*args, **kwargs)
        category = category_of(layer)
        x = args[0]
        if category == "conv":
            bn, act = plan.get(id(layer), (None, None))
            return stages.quantize_conv(layer, x, bn, act, sparse=sparse)
        if category == "norm" and supports(layer, len(x.shape)):
            norm = QuantizeLayerNorm(
                clone_layer(layer, x.shape), name=f"quant_{layer.name}"
            )
            norm.trainable = layer.trainable
            return norm(x)
        if category == "norm":  # Another axis or rms_scaling: no int8 form.
            category = None
        if category == "stage":
            rewrite = STAGE_REWRITES[
                next(c for c in type(layer).__mro__ if c in STAGE_REWRITES)
            ]
            return rewrite(layer, x, sparse=sparse)
        if category is None and unsupported == "raise":
            raise _unsupported_error(layer)
        out = fresh(layer, args, kwargs)
        if category in ("requantize", None):
            out = ActivationQuantizer(name=f"{layer.name}_quantizer")(out)
        return out

    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call_function
    )


def _quantize(model, unsupported, sparse, quantize_inputs):
    clusters = cluster.number_of_clusters(model)
    if clusters:  # Cluster-preserving QAT: clustered kernels stay clustered.
        model = cluster.strip_clustering(model)
    model = prune.strip_pruning_for_quantization(model)
    qat = _quantize_graph(
        graph.as_functional(model), unsupported, sparse, quantize_inputs
    )
    if clusters:
        cluster.preserve_clusters(qat, clusters)
    return qat


def quantize_model(model, unsupported="raise", preserve_sparsity=True):
    """Return a quantization-aware-training copy of `model`.

    The copy simulates full-int8 TFLite inference while it trains: int8
    weights (symmetric; per channel for Conv/DepthwiseConv, per tensor for
    Dense), int8 activations with moving-average ranges, BatchNorm folded
    into the preceding convolution and ReLU/ReLU6 fused. After `fit`, the
    TFLite converter turns it into a full-int8 model without representative
    data. `model` is not modified. tf_keras models are routed to
    `tensorflow_model_optimization.quantization.keras.quantize_model`.

    Args:
        model: keras.Model. A built Sequential or Functional model; nested
            backbone models and models from `kmt.attach` are supported.
        unsupported: str. What to do with a layer missing from
            `QUANTIZE_REGISTRY`: `"raise"` a ValueError naming it, or
            `"float"` to keep it in float with its output fake-quantized.
            Defaults to `"raise"`.
        preserve_sparsity: bool. Keep weights that are exactly zero at zero
            (prune first, then quantize: PQAT). Pruning wrappers are
            stripped first. Defaults to `True`.

    A model from `kmt.optimize.cluster_weights` is stripped of its
    clustering wrappers and its kernels are constrained to stay clustered
    (cluster-preserving QAT, `kmt.optimize.preserve_clusters`).

    Returns:
        A new Functional keras.Model.

    Example:

    >>> import keras
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3), keras.layers.ReLU(),
    ...     keras.layers.Flatten(), keras.layers.Dense(3)])
    >>> qat = kmt.optimize.quantize_model(model)
    >>> qat.output_shape
    (None, 3)
    """
    if tfmot_bridge.is_tf_keras_model(model):
        return tfmot_bridge.quantize_model(model)
    graph.check_model(model, "quantize_model()")
    if unsupported not in UNSUPPORTED_POLICIES:
        raise ValueError(
            "Received an invalid value for `unsupported`, expected one of "
            f"{UNSUPPORTED_POLICIES}. Received: unsupported={unsupported!r}"
        )
    return _quantize(model, unsupported, bool(preserve_sparsity), True)
