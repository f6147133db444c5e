"""Gradients written in builtin TFLite ops, for an exported training step.

TensorFlow differentiates some ops with gradient kernels LiteRT does not
have as builtins (`ReluGrad`, `MaxPoolGrad`, `AvgPoolGrad`, `Conv2DBackpropFilter`,
`DepthwiseConv2dNativeBackpropInput`, `StridedSliceGrad` from slicing a
variable, as `MicroTune` does per group, ...); LiteRT wheels and Android
builds have no Flex delegate to run them. `builtin_gradients()` is a context
manager: the ops created under it (tracing the model inside the train
`tf.function`) are differentiated by `tf.gradients` with the functions
below instead, each the same mathematics written in ops TFLite converts to
builtins (SELECT_V2, MUL, PAD, RESHAPE, BATCH_MATMUL, TRANSPOSE_CONV,
DEPTHWISE_CONV_2D, SCATTER_ND, ...). The model's layers, weights and
forward ops are unchanged.

Uses only public TensorFlow API: `tf.RegisterGradient` and
`tf.Graph.gradient_override_map`, which `tf.gradients` honours.

Differences from TensorFlow's kernels: MaxPool splits the gradient evenly
between tied maxima of a window (TensorFlow gives it to the first); a tie
is between exactly equal floats, which after a ReLU is a window of zeros,
whose gradient the ReLU zeroes anyway.
"""

from __future__ import annotations

import contextlib

_PREFIX = "KerasMicrotuneBuiltin"
_OPS = (
    "Relu",
    "Relu6",
    "Sigmoid",
    "Tanh",
    "Rsqrt",
    "Sqrt",
    "MaxPool",
    "AvgPool",
    "Conv2D",
    "DepthwiseConv2dNative",
    "StridedSlice",
)
_registered = False


class UnsupportedGradientError(ValueError):
    """An op's gradient has no builtin formulation here (with what to do)."""


def _static_shape(tensor, what):
    shape = tensor.shape
    if shape.rank is None or any(d is None for d in shape.as_list()):
        raise UnsupportedGradientError(
            f"{what} needs static shapes to be differentiated in builtin ops; "
            f"received shape {shape}. Export with a fixed batch size."
        )
    return shape.as_list()


def _attr(op, name):
    value = op.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


def _check_nhwc(op):
    if _attr(op, "data_format") != "NHWC":
        raise UnsupportedGradientError(
            f"{op.type} {op.name!r}: only NHWC data is supported in a trainable "
            "export (Keras' default channels_last)."
        )


def _same_pads(size, out, kernel, stride):
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pads(op, in_hw, out_hw, kernel, strides):
    padding = _attr(op, "padding")
    if padding == "VALID":
        return [(0, 0), (0, 0)]
    if padding == "SAME":
        return [
            _same_pads(i, o, k, s) for i, o, k, s in zip(in_hw, out_hw, kernel, strides)
        ]
    raise UnsupportedGradientError(
        f"{op.type} {op.name!r}: padding {padding!r} is not supported in a "
        "trainable export; use padding 'same' or 'valid'."
    )


def _taps(x, pads, kernel, strides, out_hw):
    """Yield `(i, j, patch)`: the input under kernel tap (i, j) at every
    output position, shape (batch, out_h, out_w, channels)."""
    import tensorflow as tf

    xp = tf.pad(x, [(0, 0), *pads, (0, 0)])
    (sh, sw), (oh, ow) = strides, out_hw
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield (
                i,
                j,
                xp[
                    :, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw, :
                ],
            )


def _conv_geometry(op, kernel_hw):
    _check_nhwc(op)
    dilations = list(op.get_attr("dilations"))
    if dilations != [1, 1, 1, 1]:
        raise UnsupportedGradientError(
            f"{op.type} {op.name!r}: dilated convolutions are not supported in "
            "a trainable export."
        )
    x, y = op.inputs[0], op.outputs[0]
    in_shape = _static_shape(x, op.type)
    out_shape = _static_shape(y, op.type)
    strides = list(op.get_attr("strides"))[1:3]
    pads = _pads(op, in_shape[1:3], out_shape[1:3], kernel_hw, strides)
    return in_shape, out_shape, strides, pads


def _relu(op, grad):
    import tensorflow as tf

    return tf.where(op.outputs[0] > 0, grad, tf.zeros_like(grad))


def _relu6(op, grad):
    import tensorflow as tf

    y = op.outputs[0]
    return tf.where(tf.logical_and(y > 0, y < 6), grad, tf.zeros_like(grad))


def _sigmoid(op, grad):
    y = op.outputs[0]
    return grad * y * (1 - y)


def _tanh(op, grad):
    y = op.outputs[0]
    return grad * (1 - y * y)


def _rsqrt(op, grad):
    y = op.outputs[0]
    return grad * -0.5 * y * y * y


def _sqrt(op, grad):
    return grad * 0.5 / op.outputs[0]


def _pool_window(op, kind, what):
    """The NHWC pooling window of `op`, refused unless it equals the stride."""
    _check_nhwc(op)
    ksize = list(op.get_attr("ksize"))
    strides = list(op.get_attr("strides"))
    if ksize != strides or ksize[0] != 1 or ksize[3] != 1:
        raise UnsupportedGradientError(
            f"{kind} {op.name!r}: a trainable export differentiates {what} "
            f"whose window equals its stride; received ksize={ksize}, "
            f"strides={strides}. Train only layers after it, or use such pooling."
        )
    return ksize


def _max_pool(op, grad):
    """Windows equal to their stride: the gradient goes to the window's
    maxima, as a mask over the input reshaped into windows."""
    import tensorflow as tf

    ksize = _pool_window(op, "MaxPool", "max pooling")
    x, y = op.inputs[0], op.outputs[0]
    b, h, w, c = _static_shape(x, "MaxPool")
    _, oh, ow, _ = _static_shape(y, "MaxPool")
    kh, kw = ksize[1:3]
    same = _attr(op, "padding") == "SAME"
    if same:  # Pad with a value below any maximum; a window always has an input.
        (top, _), (left, _) = _pads(op, (h, w), (oh, ow), (kh, kw), (kh, kw))
        bottom, right = oh * kh - h - top, ow * kw - w - left
        xp = tf.pad(
            x,
            [(0, 0), (top, bottom), (left, right), (0, 0)],
            constant_values=tf.constant(x.dtype.min, x.dtype),
        )
    else:  # VALID ignores trailing rows and columns.
        xp = x[:, : oh * kh, : ow * kw, :]
    windows = tf.reshape(xp, (b, oh, kh, ow, kw, c))
    mask = tf.cast(tf.equal(windows, tf.reshape(y, (b, oh, 1, ow, 1, c))), x.dtype)
    count = tf.reduce_sum(mask, axis=(2, 4), keepdims=True)
    spread = mask * tf.reshape(grad, (b, oh, 1, ow, 1, c)) / count
    spread = tf.reshape(spread, (b, oh * kh, ow * kw, c))
    if same:
        return spread[:, top : top + h, left : left + w, :]
    return tf.pad(spread, [(0, 0), (0, h - oh * kh), (0, w - ow * kw), (0, 0)])


def _avg_pool(op, grad):
    """Windows equal to their stride: each input gets its window's gradient
    over the window's count of inputs (SAME padding counts no padding)."""
    import numpy as np
    import tensorflow as tf

    ksize = _pool_window(op, "AvgPool", "average pooling")
    x = op.inputs[0]
    b, h, w, c = _static_shape(x, "AvgPool")
    _, oh, ow, _ = _static_shape(op.outputs[0], "AvgPool")
    kh, kw = ksize[1:3]
    same = _attr(op, "padding") == "SAME"
    (top, _), (left, _) = _pads(op, (h, w), (oh, ow), (kh, kw), (kh, kw))
    if not same:
        top = left = 0
    rows = np.clip(np.arange(oh) * kh - top + kh, 0, h) - np.clip(
        np.arange(oh) * kh - top, 0, h
    )
    cols = np.clip(np.arange(ow) * kw - left + kw, 0, w) - np.clip(
        np.arange(ow) * kw - left, 0, w
    )
    count = np.outer(rows, cols).reshape(1, oh, 1, ow, 1, 1).astype("float32")
    spread = tf.reshape(grad, (b, oh, 1, ow, 1, c)) / count
    spread = tf.broadcast_to(spread, (b, oh, kh, ow, kw, c))
    spread = tf.reshape(spread, (b, oh * kh, ow * kw, c))
    if same:
        return spread[:, top : top + h, left : left + w, :]
    return tf.pad(spread, [(0, 0), (0, h - oh * kh), (0, w - ow * kw), (0, 0)])


def _conv2d(op, grad):
    """Input gradient: TRANSPOSE_CONV; filter gradient: one matmul per tap."""
    import tensorflow as tf

    x, kernel = op.inputs[0], op.inputs[1]
    kh, kw, cin, cout = _static_shape(kernel, "Conv2D")
    in_shape, out_shape, strides, pads = _conv_geometry(op, (kh, kw))
    if in_shape[3] != cin:
        raise UnsupportedGradientError(
            f"Conv2D {op.name!r}: grouped convolutions are not supported in a "
            "trainable export."
        )
    d_input = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=in_shape,
        filter=kernel,
        out_backprop=grad,
        strides=op.get_attr("strides"),
        padding=_attr(op, "padding"),
    )
    g = tf.reshape(grad, (-1, cout))
    taps = [
        tf.matmul(tf.reshape(patch, (-1, cin)), g, transpose_a=True)
        for _, _, patch in _taps(x, pads, (kh, kw), strides, out_shape[1:3])
    ]
    d_kernel = tf.reshape(tf.stack(taps), (kh, kw, cin, cout))
    return d_input, d_kernel


def _dilate(g, axis, stride, length):
    """Insert `stride - 1` zeros between the entries of `g` along `axis`
    (1 or 2), keeping the first `length`."""
    import tensorflow as tf

    if stride == 1:
        return g
    shape = g.shape.as_list()
    parts = [tf.expand_dims(g, axis + 1)]
    zero_shape = [*shape[: axis + 1], stride - 1, *shape[axis + 1 :]]
    parts.append(tf.zeros(zero_shape, g.dtype))
    wide = tf.reshape(
        tf.concat(parts, axis + 1),
        [*shape[:axis], shape[axis] * stride, *shape[axis + 1 :]],
    )
    return wide[:, :length] if axis == 1 else wide[:, :, :length]


def _depthwise(op, grad):
    """Input gradient: a depthwise convolution of the (zero-dilated, padded)
    output gradient with the flipped kernel; filter gradient: a product
    summed per tap. Only depthwise ops, no channels x channels filter."""
    import tensorflow as tf

    x, kernel = op.inputs[0], op.inputs[1]
    kh, kw, c, m = _static_shape(kernel, "DepthwiseConv2dNative")
    in_shape, out_shape, strides, pads = _conv_geometry(op, (kh, kw))
    (b, h, w, _), (_, oh, ow, _) = in_shape, out_shape
    g = grad
    lengths = []
    for axis, (out, s) in enumerate(zip((oh, ow), strides), start=1):
        lengths.append((out - 1) * s + 1)
        g = _dilate(g, axis, s, lengths[-1])
    padded = [h + sum(pads[0]), w + sum(pads[1])]
    g = tf.pad(
        g,
        [
            (0, 0),
            (kh - 1, padded[0] - lengths[0]),
            (kw - 1, padded[1] - lengths[1]),
            (0, 0),
        ],
    )
    flipped = tf.reshape(kernel[::-1, ::-1], (kh, kw, c * m, 1))
    d_padded = tf.nn.depthwise_conv2d(g, flipped, [1, 1, 1, 1], "VALID")
    if m > 1:
        d_padded = tf.reduce_sum(tf.reshape(d_padded, (b, *padded, c, m)), axis=-1)
    top, left = pads[0][0], pads[1][0]
    d_input = d_padded[:, top : top + h, left : left + w, :]
    g = tf.reshape(grad, (*out_shape[:3], c, m))
    taps = [
        tf.reduce_sum(patch[..., None] * g, axis=(0, 1, 2))
        for _, _, patch in _taps(x, pads, (kh, kw), strides, out_shape[1:3])
    ]
    d_kernel = tf.reshape(tf.stack(taps), (kh, kw, c, m))
    return d_input, d_kernel


def _strided_slice(op, grad):
    """Scatter the gradient back to the positions the slice took: the same
    slice of an index tensor (a constant) says where."""
    import tensorflow as tf

    shape = _static_shape(op.inputs[0], "StridedSlice")
    n = 1
    for d in shape:
        n *= d
    index = tf.reshape(tf.range(n), shape)
    taken = tf.raw_ops.StridedSlice(
        input=index,
        begin=op.inputs[1],
        end=op.inputs[2],
        strides=op.inputs[3],
        begin_mask=op.get_attr("begin_mask"),
        end_mask=op.get_attr("end_mask"),
        ellipsis_mask=op.get_attr("ellipsis_mask"),
        new_axis_mask=op.get_attr("new_axis_mask"),
        shrink_axis_mask=op.get_attr("shrink_axis_mask"),
    )
    flat = tf.scatter_nd(tf.reshape(taken, (-1, 1)), tf.reshape(grad, (-1,)), [n])
    return tf.reshape(flat, shape), None, None, None


_GRADIENTS = {
    "Relu": _relu,
    "Relu6": _relu6,
    "Sigmoid": _sigmoid,
    "Tanh": _tanh,
    "Rsqrt": _rsqrt,
    "Sqrt": _sqrt,
    "MaxPool": _max_pool,
    "AvgPool": _avg_pool,
    "Conv2D": _conv2d,
    "DepthwiseConv2dNative": _depthwise,
    "StridedSlice": _strided_slice,
}


def _register():
    global _registered
    if _registered:
        return
    import tensorflow as tf

    for name, fn in _GRADIENTS.items():
        tf.RegisterGradient(_PREFIX + name)(fn)
    _registered = True


@contextlib.contextmanager
def builtin_gradients():
    """Inside a `tf.function` being traced: ops created in this block are
    differentiated (by `tf.gradients`) in builtin TFLite ops.

    Example:
        >>> @tf.function
        ... def step(x, y):
        ...     with builtin_gradients():
        ...         loss = loss_fn(y, model(x))
        ...     return tf.gradients(loss, variables)
    """
    import tensorflow as tf

    _register()
    graph = tf.compat.v1.get_default_graph()
    with graph.gradient_override_map({op: _PREFIX + op for op in _OPS}):
        yield
