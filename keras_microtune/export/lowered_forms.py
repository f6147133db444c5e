"""The lowered forms: Keras activations and normalizations written with ops
that TFLite Micro runs in int8 (see `lowering` for when each is used).

Each function takes what the Keras function takes and uses only `keras.ops`.
Two TFLite int8 quantizer habits shape them: MINIMUM/MAXIMUM give their input
the scale of their output (so a clip acts on a scaled copy, never on a tensor
used elsewhere), and a MUL by 1 does not survive conversion.
"""

from __future__ import annotations

import numpy as np

# GELU's tanh form, 0.5 x (1 + tanh(a (x + b x^3))), is x * sigmoid(2 a x (1 + b x^2)).
_GELU_A2 = 2.0 * float(np.sqrt(2.0 / np.pi))
_GELU_B = 0.044715
# Beyond |x| = 4 the gate is within 2e-5 of 0 or 1; clipping there keeps the
# int8 range of the cubic small.
_GELU_CLIP = 4.0
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _ops():
    from keras import ops

    return ops


def _expm1_nonpositive(x, scale=1.0):
    """exp(min(scale * x, 0)) - 1, exactly, without EXP (no int8 TFLite Micro
    kernel): tanh(m / 2) / (1 - sigmoid(m)) with m = min(scale * x, 0).

    The MINIMUM acts on `k * x` (k != 1), not on `x`: TFLite's int8 quantizer
    gives MINIMUM's input the scale of its output, which would clip `x` to
    [min, 0] everywhere else it is used (and no MUL by 1 survives conversion).
    """
    ops = _ops()
    k = 0.5 * scale if abs(0.5 * scale - 1.0) > 1e-6 else 0.25 * scale
    h = ops.minimum(k * x, 0.0)  # m = (scale / k) * h
    c = scale / k
    return ops.tanh((0.5 * c) * h) / (1.0 - ops.sigmoid(c * h))


def _clip(x, bound):
    """clip(x, -bound, bound), as MINIMUM/MAXIMUM on `x / bound`.

    TFLite's int8 quantizer gives MINIMUM/MAXIMUM's input the scale of their
    output; clipping `x` itself would clip `x` everywhere else it is used.
    """
    return _ops().clip(x * (1.0 / bound), -1.0, 1.0)


def gelu(x):
    """GELU as `x * sigmoid(2a x (1 + b x^2))`, x clipped to [-4, 4] in the gate.

    Ops: MUL, MINIMUM, MAXIMUM, ADD, LOGISTIC (int8 in TFLite Micro; the
    converter folds the clip into a MUL's int8 range). Within 5e-4 of the
    exact (erf) GELU on [-12, 12] and 2e-4 of its tanh approximation on
    [-8, 8]; beyond |x| = 4 the gate's error is at most 1.7e-5, times |x|.
    """
    u = _clip(x, _GELU_CLIP)  # c / 4 with c = clip(x, -4, 4).
    c = _GELU_CLIP
    return x * _ops().sigmoid(u * (_GELU_A2 * c + (_GELU_A2 * _GELU_B * c**3) * u * u))


def elu(x, alpha=1.0):
    """ELU: relu(x) + alpha * (exp(min(x, 0)) - 1), exact."""
    return _ops().relu(x) + alpha * _expm1_nonpositive(x)


def selu(x):
    """SELU: scale * elu(x, alpha) with Keras' constants, exact."""
    return _SELU_SCALE * elu(x, _SELU_ALPHA)


def celu(x, alpha=1.0):
    """CELU: relu(x) + alpha * (exp(min(x, 0) / alpha) - 1), exact."""
    return _ops().relu(x) + alpha * _expm1_nonpositive(x, 1.0 / alpha)


def mish(x):
    """mish: x * tanh(softplus(x)) = x * n / (2 - n), n = s (2 - s), s = sigmoid(x)."""
    ops = _ops()
    s = ops.sigmoid(x)
    n = s * (2.0 - s)
    return x * n / (2.0 - n)


def soft_shrink(x, threshold=0.5):
    """soft-shrink: x - clip(x, -threshold, threshold), exact."""
    return x - threshold * _clip(x, threshold)


def sparse_plus(x):
    """sparse-plus: (clip(x, -1, 1) + 1)^2 / 4 + relu(x - 1), exact."""
    c = _clip(x, 1.0) + 1.0
    return 0.25 * c * c + _ops().relu(x - 1.0)


def _last_axis_only(layer, ndims):
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return [a % ndims for a in axes] == [ndims - 1]


def layer_norm_call(layer):
    """`LayerNormalization.call` as (x - mean) * rsqrt(var + eps) * gamma + beta."""
    ops = _ops()

    def call(inputs):
        x = ops.cast(inputs, "float32")
        ndims = len(x.shape)
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        axes = sorted(a % ndims for a in axes)
        shape = [x.shape[a] if a in axes else 1 for a in range(ndims)]
        d = x - ops.mean(x, axis=axes, keepdims=True)
        if _last_axis_only(layer, ndims) and not layer.rms_scaling:
            y = _l2_normalized(d, layer.epsilon)
        else:
            inv = ops.rsqrt(ops.mean(d * d, axis=axes, keepdims=True) + layer.epsilon)
            y = (x if layer.rms_scaling else d) * inv
        if layer.gamma is not None:
            y = y * ops.reshape(ops.cast(layer.gamma, "float32"), shape)
        if layer.beta is not None and not layer.rms_scaling:
            y = y + ops.reshape(ops.cast(layer.beta, "float32"), shape)
        return ops.cast(y, layer.compute_dtype)

    return call


def rms_norm_call(layer):
    """`RMSNormalization.call` with x * x for Keras' SQUARE (float in TFLite)."""
    ops = _ops()

    def call(inputs):
        x = ops.cast(inputs, "float32")
        mean_square = ops.mean(x * x, axis=layer.axis, keepdims=True)
        y = x * ops.rsqrt(mean_square + layer.epsilon)
        return ops.cast(y * ops.cast(layer.scale, "float32"), layer.compute_dtype)

    return call


def unit_norm_call(layer):
    """`UnitNormalization.call` without SQUARE (float in TFLite) and SUM (its
    int8 TFLite Micro kernel was seen 39 steps off LiteRT's):
    x * min(rsqrt(sum x^2), 1 / eps) = x * rsqrt(max(mean x^2, eps^2 / n)) / sqrt(n).
    """
    ops = _ops()

    def call(inputs):
        x = ops.cast(inputs, "float32")
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        n = int(np.prod([x.shape[a] for a in axes]))
        mean_square = ops.mean(x * x, axis=axes, keepdims=True)
        inv = ops.rsqrt(ops.maximum(mean_square, 1e-24 / n))  # Keras' eps: 1e-12.
        return ops.cast(x * inv * float(1.0 / np.sqrt(n)), layer.compute_dtype)

    return call


def group_norm_call(layer):
    """`GroupNormalization.call` as LayerNormalization's form, per group."""
    ops = _ops()

    def call(inputs):
        x = ops.cast(inputs, "float32")
        ndims = len(x.shape)
        a = layer.axis % ndims
        channels = x.shape[a]
        grouped = [-1, *x.shape[1:]]
        grouped[a] = channels // layer.groups
        grouped.insert(a, layer.groups)
        g = ops.reshape(x, grouped)
        axes = [i for i in range(1, len(grouped)) if i != a]
        d = g - ops.mean(g, axis=axes, keepdims=True)
        y = d * ops.rsqrt(ops.mean(d * d, axis=axes, keepdims=True) + layer.epsilon)
        shape = [1] * ndims
        shape[a] = channels // layer.groups
        shape.insert(a, layer.groups)
        if layer.scale:
            y = y * ops.reshape(ops.cast(layer.gamma, "float32"), shape)
        if layer.center:
            y = y + ops.reshape(ops.cast(layer.beta, "float32"), shape)
        return ops.cast(ops.reshape(y, [-1, *x.shape[1:]]), layer.compute_dtype)

    return call


# Normalization layers: Keras class name -> (op name, call factory, form).


def _l2_normalized(d, epsilon):
    """d / sqrt(mean(d^2) + eps) over the last axis, as TFLite's int8
    L2_NORMALIZATION (int32 sums inside) of `[d, sqrt(n eps)]`, first n kept.

    The same in float; in int8 it avoids quantizing the variance, whose range
    across tokens (1e-2 to 2e1 seen in a small transformer) an int8 scale
    cannot hold: the MEAN/RSQRT form reached cosine 0.91 there, this 0.99.
    """
    import tensorflow as tf  # tf.math.l2_normalize converts to L2_NORMALIZATION.

    ops = _ops()
    n = d.shape[-1]
    pad = ops.full_like(d[..., :1], float(np.sqrt(n * epsilon)))
    z = tf.math.l2_normalize(ops.concatenate([d, pad], axis=-1), axis=-1)
    return z[..., :n] * float(np.sqrt(n))
