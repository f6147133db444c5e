"""Fold BatchNormalization into the convolution or Dense layer before it.

`fold_batch_norm(model)` returns a copy of a Sequential or Functional model
in which every BatchNormalization whose input is the linear output of a
Conv1D/Conv2D, DepthwiseConv1D/2D or Dense layer (used by that BatchNorm
only) is folded into it: `kernel * gamma / sqrt(var + eps)` per output
channel and `(bias - mean) * gamma / sqrt(var + eps) + beta`, the BatchNorm
replaced by a pass-through `FoldedBatchNorm` layer of the same name. In
inference mode the copy computes what the model computes (up to float
rounding).

Why: TFLite's converter folds BatchNorm anyway, after any clustering, so a
kernel clustered to 16 values for the whole tensor
(`cluster_weights(..., cluster_per_channel=False)`) reaches int8 with its
channels scaled apart (16 values per channel, not per tensor). Folding first
and then clustering keeps 16 values per kernel into the flatbuffer, which
`convert(..., weight_quantization="per_tensor", compression="lut4")` stores
with one 16-entry table per kernel.
"""

import keras
import numpy as np

from keras_microtune._api import serializable
from keras_microtune.optimize import graph

_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense) + _DEPTHWISE
_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)


@serializable
class FoldedBatchNorm(keras.layers.Layer):
    """Where a folded BatchNormalization was: passes its input through."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _producer(bn):
    """The layer whose output `bn` normalises, if foldable into it; else None."""
    if len(bn._inbound_nodes) != 1:
        return None
    tensor = bn._inbound_nodes[0].input_tensors
    if len(tensor) != 1:
        return None
    layer = tensor[0]._keras_history.operation
    if not isinstance(layer, _FOLDABLE) or isinstance(layer, _TRANSPOSED):
        return None
    if len(layer._inbound_nodes) != 1 or len(layer._outbound_nodes) != 1:
        return None
    if keras.activations.serialize(layer.activation) not in ("linear", None):
        if getattr(layer.activation, "__name__", "") != "linear":
            return None
    axis = bn.axis if isinstance(bn.axis, int) else bn.axis[0]
    if axis not in (-1, len(bn.input.shape) - 1):
        return None
    return layer


def _folded(layer, bn, input_shape):
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float64")
    channels = int(bn.moving_mean.shape[0])
    gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else np.ones(channels)
    beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else np.zeros(channels)
    mean = keras.ops.convert_to_numpy(bn.moving_mean).astype("float64")
    var = keras.ops.convert_to_numpy(bn.moving_variance).astype("float64")
    scale = gamma / np.sqrt(var + bn.epsilon)
    bias = (
        keras.ops.convert_to_numpy(layer.bias).astype("float64")
        if layer.use_bias
        else np.zeros(channels)
    )
    if isinstance(layer, _DEPTHWISE):  # (..., in, multiplier): channel in*m+k.
        kernel = kernel * scale.reshape(kernel.shape[-2:])
    else:
        kernel = kernel * scale
    config = layer.get_config()
    config["use_bias"] = True
    copy = layer.__class__.from_config(config)
    copy.build(input_shape)
    copy.kernel.assign(kernel.astype("float32"))
    copy.bias.assign(((bias - mean) * scale + beta).astype("float32"))
    copy.trainable = layer.trainable
    return copy


def fold_batch_norm(model):
    """Return a copy of `model` with BatchNorms folded into the layers before them.

    Args:
        model: keras.Model. A built Sequential or Functional model. BatchNorms
            that follow an activation, a layer used elsewhere too, or a
            custom layer stay as they are.

    Returns:
        A new keras.Model; `model` is not changed.
    """
    graph.check_model(model, "fold_batch_norm()")
    model = graph.as_functional(model)
    pairs = {}
    for layer in graph.walk(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            producer = _producer(layer)
            if producer is not None:
                pairs[id(producer)] = layer
    folded = {id(bn) for bn in pairs.values()}

    def replace(layer, x):
        shape = keras.tree.map_structure(lambda t: t.shape, x)
        if id(layer) in pairs:
            return _folded(layer, pairs[id(layer)], shape)
        if id(layer) in folded:
            return FoldedBatchNorm(name=layer.name)
        return graph.clone_layer(layer, shape)

    return graph.rewrite(model, replace)
