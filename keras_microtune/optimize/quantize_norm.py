"""QuantizeLayerNorm: LayerNormalization as TFLite Micro computes it in int8.

`kmt.convert` lowers a last-axis `LayerNormalization` for TFLite Micro to
`sqrt(n) * l2_normalize([d, sqrt(n eps)])[:n] * gamma + beta` with
`d = x - mean(x)` (`export/lowered_forms.layer_norm_call`): MEAN, SUB,
CONCATENATION, L2_NORMALIZATION, STRIDED_SLICE, MUL, MUL, ADD, each output
an int8 tensor. Left in float with only its output fake-quantized, the
layer trains without the rounding of those inner tensors, the deviation
`d` above all: a token whose deviations span a few int8 steps of `d`'s
range comes out of L2_NORMALIZATION far from the float normalisation.

This wrapper computes the same lowered form with a fake quantizer on each
inner tensor where the converter puts one: moving-average ranges for the
mean, the deviation, the concatenation, the rescaled output, the
gamma-scaled one and the output; L2_NORMALIZATION's output has TFLite's
fixed int8 scale 1/128 (zero point 0). Layers with another axis, or with
`rms_scaling`, are not wrapped (`supports`): `quantize_model` keeps them
in float with their output fake-quantized (`unsupported="float"`).
"""

import keras
import numpy as np
from keras import ops

from keras_microtune._api import serializable
from keras_microtune.layers.embedding_stage import l2_normalize
from keras_microtune.optimize.quantizers import ActivationQuantizer

# TFLite's int8 L2_NORMALIZATION output: scale 1/128, zero point 0.
L2_NORM_RANGE = (-1.0, 127.0 / 128.0)
_INNER = ("mean", "deviation", "concat", "rescaled", "scaled")


def supports(layer, ndims=None):
    """Whether `QuantizeLayerNorm` simulates `layer` (last axis, no RMS)."""
    if not isinstance(layer, keras.layers.LayerNormalization) or layer.rms_scaling:
        return False
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    if ndims is None:  # Rank not known yet: one axis (`build` checks it).
        return len(axes) == 1
    return [a % ndims for a in axes] == [ndims - 1]


def _l2_normalize(x):
    """Over the last axis; on TensorFlow the op TFLite turns into
    L2_NORMALIZATION (the converter reads this graph)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.math.l2_normalize(x, axis=-1)
    return l2_normalize(x)


@serializable
class QuantizeLayerNorm(keras.layers.Layer):
    """Simulate a LayerNormalization in int8 the way TFLite Micro runs it.

    Args:
        layer: a `keras.layers.LayerNormalization` normalizing the last
            axis, without `rms_scaling`; its `gamma`/`beta` are trained.

    Example:

    >>> import numpy as np, keras
    >>> from keras_microtune.optimize.quantize_norm import QuantizeLayerNorm
    >>> norm = keras.layers.LayerNormalization()
    >>> y = QuantizeLayerNorm(norm)(np.ones((1, 3, 4), "float32"))
    >>> tuple(y.shape)
    (1, 3, 4)
    """

    def __init__(self, layer, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        self._check(layer)
        self.layer = layer
        self.quantizers = {
            name: ActivationQuantizer(name=f"{name}_quantizer") for name in _INNER
        }
        self.l2_quantizer = ActivationQuantizer(
            fixed_range=L2_NORM_RANGE, name="l2_normalization_quantizer"
        )
        self.output_quantizer = ActivationQuantizer(name="output_quantizer")

    @staticmethod
    def _check(layer, ndims=None):
        if not supports(layer, ndims):
            raise ValueError(
                "QuantizeLayerNorm wraps a LayerNormalization over the last axis "
                f"(axis=-1) without rms_scaling. Received: layer={layer.name!r} "
                f"({type(layer).__name__}, axis={getattr(layer, 'axis', None)!r}, "
                f"rms_scaling={getattr(layer, 'rms_scaling', None)!r}). Keep it in "
                "float with quantize_model(..., unsupported='float')."
            )

    def build(self, input_shape):
        self._check(self.layer, len(input_shape))
        if not self.layer.built:
            self.layer.build(input_shape)
        for quantizer in (*self.quantizers.values(), self.l2_quantizer):
            quantizer.build(None)
        self.output_quantizer.build(input_shape)

    def call(self, inputs, training=None):
        layer, q = self.layer, self.quantizers

        def fq(name, x):
            quantizer = self.output_quantizer if name == "output" else q[name]
            return quantizer(x, training=training)

        x = ops.cast(inputs, "float32")
        n = x.shape[-1]
        mean = fq("mean", ops.mean(x, axis=-1, keepdims=True))
        d = fq("deviation", x - mean)
        pad = ops.full_like(d[..., :1], float(np.sqrt(n * layer.epsilon)))
        z = _l2_normalize(fq("concat", ops.concatenate([d, pad], axis=-1)))
        z = self.l2_quantizer(z, training=training)[..., :n]
        y = fq("rescaled", z * float(np.sqrt(n)))
        if layer.gamma is not None:
            y = y * ops.cast(layer.gamma, "float32")
            if layer.beta is not None:
                y = fq("scaled", y)
        if layer.beta is not None:
            y = y + ops.cast(layer.beta, "float32")
        return ops.cast(fq("output", y), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
        }
