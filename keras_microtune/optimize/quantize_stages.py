"""QAT forms of the four keras_microtune stage layers.

`FeatureStage`, `EmbeddingStage` and `OutputStage` are rewritten into the
standard layers they lower to (each conv/BN/ReLU triple becomes one
`QuantizeConv`), so the QAT model's graph is what the converter sees.
`MicroTune` becomes `QuantizedMicroTune`, the same layer with fake
quantization after every FULLY_CONNECTED, CONCATENATION and ADD it lowers to.
"""

import keras
from keras import ops

from keras_microtune._api import serializable
from keras_microtune.layers import MicroTune
from keras_microtune.layers.embedding_stage import l2_normalize
from keras_microtune.optimize.graph import clone_layer
from keras_microtune.optimize.quantize_conv import QuantizeConv, kind_of
from keras_microtune.optimize.quantizers import ActivationQuantizer, quantize_weights


def relu_max_value(layer):
    """`None`/`6.0` for a plain ReLU/ReLU6 layer, else False (not fusable)."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope or layer.threshold:
            return False
        return None if layer.max_value is None else float(layer.max_value)
    if isinstance(layer, keras.layers.Activation):
        name = keras.activations.serialize(layer.activation)
        return {"relu": None, "relu6": 6.0}.get(name, False)
    return False


def fused_activation(layer):
    value = relu_max_value(layer)
    if value is False or value not in (None, 6.0):
        return None
    return "relu" if value is None else "relu6"


def quantize_conv(layer, x, batch_norm=None, activation=None, name=None, sparse=False):
    """Apply a `QuantizeConv` built from copies of `layer` (and `batch_norm`)."""
    conv = clone_layer(layer, x.shape)
    bn = None
    if batch_norm is not None:
        bn = clone_layer(batch_norm, conv.compute_output_shape(x.shape))
    wrapper = QuantizeConv(
        conv,
        batch_norm=bn,
        activation=activation,
        preserve_sparsity=sparse,
        name=name or f"quant_{layer.name}",
    )
    wrapper.trainable = layer.trainable
    # Variable-level choices (attach's LoRA/bias/norm placement) carry over;
    # a frozen BatchNorm keeps folding its moving statistics.
    for source, copy in ((layer, conv), (batch_norm, bn)):
        if source is not None:
            copy.trainable = source.trainable
            for src, dst in zip(source.weights, copy.weights):
                dst.trainable = src.trainable
    return wrapper(x)


def feature_stage(stage, x, sparse=False):
    """The layers of a built `FeatureStage`, quantized, applied to `x`."""
    channels = x.shape[-1]
    if stage._one_d:
        x = keras.layers.Reshape((-1, 1, channels), name=f"{stage.name}_expand")(x)
    for block in stage._blocks:
        i = 0
        while i < len(block):
            layer = block[i]
            if kind_of(layer) is None:
                x = clone_layer(layer, x.shape, name=f"{stage.name}_{layer.name}")(x)
                i += 1
                continue
            bn = act = None
            if i + 1 < len(block) and isinstance(
                block[i + 1], keras.layers.BatchNormalization
            ):
                bn = block[i + 1]
            j = i + 1 + (bn is not None)
            if j < len(block) and fused_activation(block[j]):
                act = fused_activation(block[j])
            name = f"{stage.name}_{layer.name}"
            x = quantize_conv(layer, x, bn, act, name=name, sparse=sparse)
            i = j + (act is not None)
    if stage._one_d:
        x = keras.layers.Reshape((-1, x.shape[-1]), name=f"{stage.name}_squeeze")(x)
    return x


def embedding_stage(stage, x, sparse=False):
    rank = len(x.shape)
    if stage.pooling == "avg":
        pool = (
            keras.layers.GlobalAveragePooling1D
            if rank == 3
            else keras.layers.GlobalAveragePooling2D
        )
        x = pool(name=f"{stage.name}_pool")(x)
        x = ActivationQuantizer(name=f"{stage.name}_pool_quantizer")(x)
    elif stage.pooling == "max":
        pool = (
            keras.layers.GlobalMaxPooling1D
            if rank == 3
            else keras.layers.GlobalMaxPooling2D
        )
        x = pool(name=f"{stage.name}_pool")(x)
    elif stage.pooling == "flatten":
        x = keras.layers.Flatten(name=f"{stage.name}_flatten")(x)
    if stage.units is not None:
        name = f"{stage.name}_projection"
        x = quantize_conv(stage.projection, x, name=name, sparse=sparse)
    if stage.normalize == "l2":
        x = L2Normalize(name=f"{stage.name}_l2")(x)
        x = ActivationQuantizer(fixed_range=(-1.0, 1.0), name=f"{stage.name}_l2_q")(x)
    return x


def output_stage(stage, x, sparse=False):
    if stage.dropout_layer is not None:
        x = keras.layers.Dropout(stage.dropout, name=f"{stage.name}_dropout")(x)
    return quantize_conv(stage.dense, x, name=f"{stage.name}_dense", sparse=sparse)


@serializable
class L2Normalize(keras.layers.Layer):
    """L2-normalise the last axis (TFLite L2_NORMALIZATION)."""

    def call(self, inputs):
        return l2_normalize(inputs)


@serializable
class QuantizedMicroTune(MicroTune):
    """`MicroTune` with int8 fake quantization (weights per tensor).

    Same arguments and weights as `MicroTune`; built by `quantize_model`.
    """

    def build(self, input_shape):
        super().build(input_shape)
        q = ActivationQuantizer
        n = self.groups
        self.group_quantizers = [q(name=f"group_{i}_quantizer") for i in range(n)]
        self.down_quantizers = (
            [q(name=f"down_{i}_quantizer") for i in range(n)] if self.rank else []
        )
        nonlinear = self.activation is not keras.activations.linear
        self.input_quantizer = q(name="branch_input_quantizer") if nonlinear else None
        sums = self.merge == "sum" and n > 1
        self.sum_quantizer = q(name="sum_quantizer") if sums else None
        self.output_quantizer = q(name="output_quantizer")
        for layer in (
            *self.group_quantizers,
            *self.down_quantizers,
            self.input_quantizer,
            self.sum_quantizer,
            self.output_quantizer,
        ):
            if layer is not None:
                layer.build(input_shape)

    def _branch_input(self, inputs):
        x = self.activation(inputs)
        if self.input_quantizer is None:
            return x
        return self.input_quantizer(x, training=self._training)

    def _sum(self, slices):
        return self.sum_quantizer(super()._sum(slices), training=self._training)

    def _group_map(self, x, i):
        t = self._training
        if self.rank is None:
            y = ops.matmul(x, quantize_weights(self.kernel[i]))
        else:
            h = ops.matmul(x, quantize_weights(self.kernel_down[i]))
            h = self.down_quantizers[i](h, training=t)
            y = ops.matmul(h, quantize_weights(self.kernel_up[i]))
        if self.bias is not None:
            width = self.bias.shape[0] // self.groups
            y = y + self.bias[i * width : (i + 1) * width]
        return self.group_quantizers[i](y, training=t)

    def _output(self, outputs):
        return self.output_quantizer(outputs, training=self._training)

    def call(self, inputs, training=None):
        self._training = bool(training)
        return super().call(inputs)


def microtune(layer, x, sparse=False):
    config = {**layer.get_config(), "dtype": "float32"}
    new = QuantizedMicroTune.from_config(config)
    new.build(x.shape)
    targets = {v.path: v for v in new.weights}
    for v in layer.weights:
        targets[v.path].assign(v)
    new.trainable = layer.trainable
    return new(x)
