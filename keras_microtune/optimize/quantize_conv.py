"""QuantizeConv: a convolution or dense layer with BatchNorm folded and ReLU fused.

The wrapper computes what TFLite's int8 CONV_2D / DEPTHWISE_CONV_2D /
FULLY_CONNECTED kernels compute: the BatchNorm that follows the layer is
folded into its kernel and bias, the kernel is fake-quantized (symmetric,
per channel for convolutions, per tensor for dense), ReLU/ReLU6 is applied,
and the output is fake-quantized with a moving-average range.

Keras LoRA (`enable_lora`) on the wrapped layer is seen merged: `kernel` is
`W + A B`, so the fake quantizer sees the kernel `merge_adapters` deploys
while only the LoRA factors train.

Run-time hooks (besides the quantizer flags in `quantizers`): the variable
`bn_frozen` (1.0 / 0.0). While it is 0 and the BatchNorm is trainable,
training folds the batch statistics and updates the moving ones; once it is
1 (`kmt.optimize.freeze_batch_norm(model)`) the moving statistics are used.
"""

import keras
from keras import ops

from keras_microtune._api import serializable
from keras_microtune.optimize.graph import MaskConstraint, state_constraints_supported
from keras_microtune.optimize.quantizers import (
    ActivationQuantizer,
    flag,
    quantize_weights,
)

BN_FROZEN = "bn_frozen"
FUSABLE_ACTIVATIONS = {"relu": None, "relu6": 6.0, "linear": None}


def kind_of(layer):
    """The QuantizeConv kind of a Keras layer, or None if it has none."""
    layers = keras.layers
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        return "separable"
    if isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        return "depthwise"
    if isinstance(layer, (layers.Conv1D, layers.Conv2D)) and not isinstance(
        layer, (layers.Conv1DTranspose, layers.Conv2DTranspose)
    ):
        return "conv"
    if isinstance(layer, layers.Dense):
        return "dense"
    return None


def activation_name(activation):
    """The serialized name of a Keras activation function."""
    name = keras.activations.serialize(activation)
    return name if isinstance(name, str) else None


def _expand(value, one_d):
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return value + (1,) if one_d else value


@serializable
class QuantizeConv(keras.layers.Layer):
    """Simulate an int8 conv/dense layer with folded BatchNorm and fused ReLU.

    Args:
        layer: a Dense, Conv1D/2D, DepthwiseConv1D/2D or SeparableConv1D/2D
            layer (channels_last, `groups=1`).
        batch_norm: BatchNormalization or None. The BatchNorm that follows
            `layer`, folded into it. Defaults to `None`.
        activation: str or None. `"relu"` or `"relu6"` from a following
            activation layer, fused; None keeps `layer.activation`.
            Defaults to `None`.
        preserve_sparsity: bool. Keep the kernel's zeros at zero (pruned
            then quantized models). Defaults to `False`.
    """

    def __init__(
        self, layer, batch_norm=None, activation=None, preserve_sparsity=False, **kwargs
    ):
        # Simulated int8 maths runs in float32, also under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        if isinstance(batch_norm, dict):
            batch_norm = keras.saving.deserialize_keras_object(batch_norm)
        self.kind = kind_of(layer)
        if self.kind is None:
            raise ValueError(
                "QuantizeConv wraps Dense, Conv, DepthwiseConv or SeparableConv "
                f"layers. Received: layer={layer.name!r} of type {type(layer).__name__}"
            )
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ValueError(
                f"Layer {layer.name!r} uses data_format='channels_first'; TFLite "
                "kernels are channels_last. Rebuild the model with channels_last."
            )
        if (
            getattr(layer, "groups", 1) != 1
            or getattr(layer, "padding", "") == "causal"
        ):
            raise ValueError(
                f"Layer {layer.name!r} uses groups > 1 or causal padding, which "
                "quantize_model does not support. Use groups=1 and pad explicitly "
                "with keras.layers.ZeroPadding1D."
            )
        name = activation or activation_name(layer.activation)
        self.layer = layer
        self.batch_norm = batch_norm
        self.activation = activation
        self._act_name = name if name in FUSABLE_ACTIVATIONS else None
        self._act_fn = None if self._act_name else keras.activations.get(name)
        self.preserve_sparsity = bool(preserve_sparsity)
        self.output_quantizer = ActivationQuantizer(name="output_quantizer")
        self.intermediate_quantizer = (
            ActivationQuantizer(name="intermediate_quantizer")
            if self.kind == "separable"
            else None
        )
        self._one_d = self.kind != "dense" and layer.rank == 1

    def _kernels(self):
        if self.kind == "separable":
            return [self.layer.depthwise_kernel, self.layer.pointwise_kernel]
        return [self.layer.kernel]

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        out_shape = self.layer.compute_output_shape(input_shape)
        if self.batch_norm is not None and not self.batch_norm.built:
            self.batch_norm.build(out_shape)
        if self.batch_norm is not None:
            self.bn_frozen = flag(self, BN_FROZEN, 0.0)
        self.masks = []
        if self.preserve_sparsity:
            for i, kernel in enumerate(self._kernels()):
                value = ops.cast(ops.not_equal(kernel, 0.0), "float32")
                mask = self.add_weight(
                    name=f"sparsity_mask_{i}",
                    shape=kernel.shape,
                    initializer=keras.initializers.Constant(
                        ops.convert_to_numpy(value)
                    ),
                    trainable=False,
                )
                self.masks.append(mask)
                # With Keras LoRA `kernel` is W + A B, a tensor: the frozen
                # variable W takes the constraint, `call` masks the sum.
                if getattr(self.layer, "lora_enabled", False):
                    kernel = self.layer._kernel
                if state_constraints_supported():  # On JAX `call` alone masks.
                    kernel.constraint = MaskConstraint(mask, kernel.constraint)
        self.output_quantizer.build(out_shape)
        if self.intermediate_quantizer is not None:
            self.intermediate_quantizer.build(None)

    # -- maths ------------------------------------------------------------
    def _spatial_kernel(self, kernel):
        return ops.expand_dims(kernel, 1) if self._one_d else kernel

    def _apply(self, x, kernels, quantize):
        """The layer's linear op on 4-D (or dense) `x` with the given kernels."""
        layer = self.layer
        if self.kind == "dense":
            k = quantize_weights(kernels[0]) if quantize else kernels[0]
            return ops.matmul(x, k)
        strides = _expand(layer.strides, self._one_d)
        dilation = _expand(layer.dilation_rate, self._one_d)
        padding = layer.padding
        if self.kind == "conv":
            k = quantize_weights(kernels[0], -1) if quantize else kernels[0]
            return ops.conv(x, k, strides, padding, dilation_rate=dilation)
        dw = kernels[0]
        if quantize:
            shape = tuple(dw.shape)
            flat = ops.reshape(dw, shape[:2] + (1, shape[2] * shape[3]))
            dw = ops.reshape(quantize_weights(flat, -1), shape)
        y = ops.depthwise_conv(x, dw, strides, padding, dilation_rate=dilation)
        if self.kind == "depthwise":
            return y
        if quantize:  # Its range follows only while QAT is on (see `call`).
            y = self.intermediate_quantizer(
                y, training=self._training, update_when=self.output_quantizer.enabled
            )
        pw = quantize_weights(kernels[1], -1) if quantize else kernels[1]
        return ops.conv(y, pw, 1, "valid")

    def _fold(self, kernels, scale):
        """Multiply the output channels of the (last) kernel by `scale`."""
        kernels = list(kernels)
        k = kernels[-1]
        if self.kind == "depthwise":
            scale = ops.reshape(scale, tuple(k.shape[-2:]))
        kernels[-1] = k * scale
        return kernels

    def call(self, inputs, training=None):
        self._training = bool(training)
        x = ops.expand_dims(inputs, 2) if self._one_d else inputs
        kernels = [self._spatial_kernel(k) for k in self._kernels()]
        if self.masks:
            kernels = [k * self._spatial_kernel(m) for k, m in zip(kernels, self.masks)]
        bias = self.layer.bias if self.layer.use_bias else 0.0
        bn = self.batch_norm
        float_out = None
        if bn is None:
            shift = bias
        else:
            gamma = bn.gamma if bn.scale else 1.0
            beta = bn.beta if bn.center else 0.0
            mean, var = bn.moving_mean, bn.moving_variance
            if training and bn.trainable:
                raw = self._apply(x, kernels, quantize=False) + bias
                axes = tuple(range(len(raw.shape) - 1))
                batch_mean, batch_var = ops.moments(raw, axes)
                frozen = self.bn_frozen
                m = bn.momentum
                mean = frozen * mean + (1 - frozen) * batch_mean
                var = frozen * var + (1 - frozen) * batch_var
                for stat, new in (
                    (bn.moving_mean, batch_mean),
                    (bn.moving_variance, batch_var),
                ):
                    updated = m * stat + (1 - m) * ops.stop_gradient(new)
                    stat.assign(frozen * stat + (1 - frozen) * updated)
            scale = gamma * ops.rsqrt(var + bn.epsilon)
            shift = beta + (bias - mean) * scale
            if training and bn.trainable:
                float_out = (raw - bias) * scale + shift
            kernels = self._fold(kernels, scale)

        def quantized():
            return self._activate(self._apply(x, kernels, quantize=True) + shift)

        def dequantized():
            if float_out is not None:
                return self._activate(float_out)
            return self._activate(self._apply(x, kernels, quantize=False) + shift)

        if not training:
            out = quantized()
        elif keras.backend.backend() == "jax":
            # JAX cannot update variables (the intermediate range) inside a
            # conditional branch: both run, the flag selects.
            out = ops.where(
                self.output_quantizer.enabled > 0.5, quantized(), dequantized()
            )
        else:
            out = ops.cond(self.output_quantizer.enabled > 0.5, quantized, dequantized)
        # Outside the branches: the output range updates once per step.
        out = self.output_quantizer(out, training=self._training)
        out = out if self._act_fn is None else self._act_fn(out)
        return ops.squeeze(out, 2) if self._one_d else out

    def _activate(self, y):
        if self._act_name is not None:
            y = ops.relu(y) if self._act_name == "relu" else y
            if self._act_name == "relu6":
                y = ops.relu6(y)
        return y

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "layer": serialize(self.layer),
            "batch_norm": None
            if self.batch_norm is None
            else serialize(self.batch_norm),
            "activation": self.activation,
            "preserve_sparsity": self.preserve_sparsity,
        }
