"""FeatureStage: depthwise-separable convolution blocks for 1-D and 2-D inputs."""

import keras
from keras import ops

from keras_microtune._api import serializable

ACTIVATIONS = {"relu": None, "relu6": 6.0}
POOLINGS = (None, "max", "avg")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive integer. "
            f"Received: {name}={value!r}"
        )
    return value


def _per_block(name, value, blocks):
    """Accept one int for every block or a list with one int per block."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * blocks
    if len(values) != blocks:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected an int or a list of "
            f"{blocks} ints (one per block). Received: {name}={value!r}"
        )
    return [_positive_int(name, v) for v in values]


def _lora_ranks(value, blocks, stem):
    """Normalise `lora_rank` to None, an int, or {conv name: rank}."""
    names = (["stem_conv"] if stem else []) + [f"block{i}_pw" for i in range(blocks)]
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return None if value is None else _positive_int("lora_rank", value)
    if isinstance(value, (list, tuple)):
        if len(value) != blocks:
            raise ValueError(
                "Received an invalid value for `lora_rank`, expected None, an int, "
                f"a list of {blocks} ints or None (one per block), or a dict "
                f"{{conv name: rank}} with names in {names}. "
                f"Received: lora_rank={value!r}"
            )
        value = {f"block{i}_pw": r for i, r in enumerate(value) if r}
    if not isinstance(value, dict) or not set(value) <= set(names):
        raise ValueError(
            "Received an invalid value for `lora_rank`, expected None, an int, a "
            "list of ints (one per block) or a dict {conv name: rank} with names "
            f"in {names} (depthwise convolutions have no LoRA in Keras; train "
            f"their BatchNorm instead). Received: lora_rank={value!r}"
        )
    ranks = {k: _positive_int("lora_rank", v) for k, v in value.items()}
    return {name: ranks[name] for name in names if name in ranks} or None


@serializable
class FeatureStage(keras.layers.Layer):
    """Depthwise-separable convolution blocks for feature extraction.

    Each block is: depthwise convolution -> BatchNorm -> activation ->
    1x1 convolution to `filters[i]` channels -> BatchNorm -> activation, then
    optional pooling. An optional standard convolution (`stem_filters`) runs
    first. The same configuration works on sequences `(batch, time, channels)`
    and images `(batch, height, width, channels)`: sequences are processed as
    images of width 1, so every op lowers to TFLite's CONV_2D,
    DEPTHWISE_CONV_2D and MAX/AVERAGE_POOL_2D kernels.

    Args:
        filters: int or list of ints. Output channels of each block; a list
            sets the number of blocks. Defaults to `(16, 32)`.
        kernel_size: int. Size of the depthwise (and stem) kernel along each
            spatial axis. Defaults to `3`.
        strides: int or list of ints. Stride of each block's depthwise
            convolution. Defaults to `1`.
        activation: str. `"relu"` or `"relu6"`. Defaults to `"relu"`.
        pooling: str or None. `"max"`, `"avg"` or None: pooling after each
            block. Defaults to `None`.
        pool_size: int. Pooling window and stride. Defaults to `2`.
        use_batchnorm: bool. BatchNorm after each convolution. Defaults to
            `True`.
        stem_filters: int or None. Channels of a standard convolution before
            the blocks. Defaults to `None` (no stem).
        depth_multiplier: int. Depthwise channel multiplier. Defaults to `1`.
        lora_rank: None, int, list or dict. Keras LoRA
            (`layer.enable_lora`) on the stem and 1x1 convolutions: an int for
            all of them, a list with one rank (or None) per block for the
            blocks' 1x1 convolutions, or a dict `{"stem_conv" or "block{i}_pw":
            rank}`. Their kernels then stay frozen and a zero-initialised
            low-rank update trains, which `kmt.optimize.merge_adapters` folds
            back into the kernel. Defaults to `None`.

    Input shape:
        3-D `(batch, steps, channels)` or 4-D `(batch, height, width, channels)`.

    Output shape:
        Same rank as the input, with `filters[-1]` channels and the spatial
        axes reduced by the strides and pooling.

    Example:

    >>> import numpy as np
    >>> import keras_microtune as kmt
    >>> stage = kmt.layers.FeatureStage(filters=[8, 16], pooling="max")
    >>> tuple(stage(np.zeros((2, 32, 3), "float32")).shape)
    (2, 8, 16)
    >>> tuple(stage.compute_output_shape((None, 32, 32, 3)))
    (None, 8, 8, 16)
    """

    def __init__(
        self,
        filters=(16, 32),
        kernel_size=3,
        strides=1,
        activation="relu",
        pooling=None,
        pool_size=2,
        use_batchnorm=True,
        stem_filters=None,
        depth_multiplier=1,
        lora_rank=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        filters = list(filters) if isinstance(filters, (list, tuple)) else [filters]
        if not filters:
            raise ValueError(
                "Received an invalid value for `filters`, expected an int or a "
                "non-empty list of ints. Received: filters=[]"
            )
        self.filters = [_positive_int("filters", f) for f in filters]
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.strides = _per_block("strides", strides, len(self.filters))
        if activation not in ACTIVATIONS:
            raise ValueError(
                "Received an invalid value for `activation`, expected one of "
                f"{sorted(ACTIVATIONS)}. Received: activation={activation!r}"
            )
        self.activation = activation
        if pooling not in POOLINGS:
            raise ValueError(
                f"Received an invalid value for `pooling`, expected one of {POOLINGS}. "
                f"Received: pooling={pooling!r}"
            )
        self.pooling = pooling
        self.pool_size = _positive_int("pool_size", pool_size)
        self.use_batchnorm = bool(use_batchnorm)
        self.stem_filters = (
            None
            if stem_filters is None
            else _positive_int("stem_filters", stem_filters)
        )
        self.depth_multiplier = _positive_int("depth_multiplier", depth_multiplier)
        self.lora_rank = _lora_ranks(
            lora_rank, len(self.filters), self.stem_filters is not None
        )

    def lora_rank_of(self, name):
        """The LoRA rank of the inner convolution `name` (None without LoRA)."""
        if isinstance(self.lora_rank, dict):
            return self.lora_rank.get(name)
        if name == "stem_conv" or name.endswith("_pw"):
            return self.lora_rank
        return None

    def _act(self, name):
        return keras.layers.ReLU(
            max_value=ACTIVATIONS[self.activation], name=name, dtype=self.dtype_policy
        )

    def _norm_act(self, name):
        layers = []
        if self.use_batchnorm:
            layers.append(
                keras.layers.BatchNormalization(
                    name=f"{name}_bn", dtype=self.dtype_policy
                )
            )
        layers.append(self._act(f"{name}_act"))
        return layers

    def _kernel(self, size, one_d):
        return (size, 1) if one_d else (size, size)

    def build(self, input_shape):
        if len(input_shape) not in (3, 4):
            raise ValueError(
                "FeatureStage expects 3-D (batch, steps, channels) or 4-D "
                f"(batch, height, width, channels) inputs. Received: "
                f"input_shape={input_shape}"
            )
        self._one_d = len(input_shape) == 3
        k = self._kernel(self.kernel_size, self._one_d)
        self._blocks = []
        if self.stem_filters is not None:
            self._blocks.append(
                [
                    keras.layers.Conv2D(
                        self.stem_filters,
                        k,
                        padding="same",
                        use_bias=not self.use_batchnorm,
                        name="stem_conv",
                        dtype=self.dtype_policy,
                        lora_rank=self.lora_rank_of("stem_conv"),
                    ),
                    *self._norm_act("stem"),
                ]
            )
        for i, (filters, stride) in enumerate(zip(self.filters, self.strides)):
            block = [
                keras.layers.DepthwiseConv2D(
                    k,
                    # (s, s), not (s, 1), on sequences too: the width axis
                    # is 1, so it is the same layer, and TensorFlow's own CPU
                    # depthwise kernel (used where oneDNN is off, e.g. AMD
                    # and ARM CPUs) only takes equal strides.
                    strides=(stride, stride),
                    padding="same",
                    depth_multiplier=self.depth_multiplier,
                    use_bias=not self.use_batchnorm,
                    name=f"block{i}_dw",
                    dtype=self.dtype_policy,
                ),
                *self._norm_act(f"block{i}_dw"),
                keras.layers.Conv2D(
                    filters,
                    1,
                    use_bias=not self.use_batchnorm,
                    name=f"block{i}_pw",
                    dtype=self.dtype_policy,
                    lora_rank=self.lora_rank_of(f"block{i}_pw"),
                ),
                *self._norm_act(f"block{i}_pw"),
            ]
            if self.pooling is not None:
                pool = (
                    keras.layers.MaxPooling2D
                    if self.pooling == "max"
                    else keras.layers.AveragePooling2D
                )
                size = self._kernel(self.pool_size, self._one_d)
                block.append(
                    pool(
                        size,
                        padding="same",
                        name=f"block{i}_pool",
                        dtype=self.dtype_policy,
                    )
                )
            self._blocks.append(block)
        shape = tuple(input_shape)
        if self._one_d:
            shape = shape[:2] + (1,) + shape[2:]
        for block in self._blocks:
            for layer in block:
                layer.build(shape)
                shape = layer.compute_output_shape(shape)
        # Sublayers made here start trainable; a frozen stage (e.g. one
        # reloaded from `.keras`) must not train them through the model.
        # (Inside build, `self.trainable = ...` does not reach the setter.)
        if not self.trainable:
            keras.layers.Layer.trainable.fset(self, False)

    def call(self, inputs, training=None):
        x = ops.expand_dims(inputs, 2) if self._one_d else inputs
        for block in self._blocks:
            for layer in block:
                if isinstance(layer, keras.layers.BatchNormalization):
                    x = layer(x, training=training)
                else:
                    x = layer(x)
        return ops.squeeze(x, 2) if self._one_d else x

    def compute_output_shape(self, input_shape):
        spatial = list(input_shape[1:-1])
        downsample = [s for s in self.strides]
        if self.pooling is not None:
            downsample = [s * self.pool_size for s in downsample]
        for i, dim in enumerate(spatial):
            if dim is None:
                continue
            for factor in downsample:
                dim = -(-dim // factor)
            spatial[i] = dim
        return (input_shape[0], *spatial, self.filters[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "filters": list(self.filters),
            "kernel_size": self.kernel_size,
            "strides": list(self.strides),
            "activation": self.activation,
            "pooling": self.pooling,
            "pool_size": self.pool_size,
            "use_batchnorm": self.use_batchnorm,
            "stem_filters": self.stem_filters,
            "depth_multiplier": self.depth_multiplier,
            "lora_rank": self.lora_rank,
        }
