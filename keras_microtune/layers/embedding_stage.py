"""EmbeddingStage: feature map -> fixed-length vector."""

import math

import keras
from keras import ops

from keras_microtune._api import serializable

POOLINGS = ("avg", "max", "flatten", None)
NORMALIZATIONS = (None, "l2")


def l2_normalize(x):
    """L2-normalise the last axis as `x * rsqrt(max(sum(x^2), eps))`: the
    pattern the TFLite converter fuses into one int8 L2_NORMALIZATION op
    (`keras.ops.normalize` lowers to a float island TFLite Micro disagrees on)."""
    square_sum = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(square_sum, 1e-12))


def _optional_rank(rank):
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
    ):
        raise ValueError(
            "Received an invalid value for `lora_rank`, expected None or a "
            f"positive integer. Received: lora_rank={rank!r}"
        )
    return rank


@serializable
class EmbeddingStage(keras.layers.Layer):
    """Turn a feature map into a fixed-length embedding vector.

    Pools the spatial axes (global average -> TFLite MEAN, global max ->
    MAX_POOL_2D, or flatten -> RESHAPE with a static shape, so no SHAPE/PACK
    ops reach the device), then optionally projects to `units` with a dense
    layer and L2-normalises (-> L2_NORMALIZATION).

    Args:
        pooling: str or None. `"avg"`, `"max"`, `"flatten"`, or None for
            inputs that are already vectors `(batch, features)`.
            Defaults to `"avg"`.
        units: int or None. Width of an optional dense projection.
            Defaults to `None`.
        activation: str or None. Activation of the projection. Defaults to
            `None`.
        normalize: str or None. `"l2"` to L2-normalise the embedding.
            Defaults to `None`.
        lora_rank: int or None. Keras LoRA on the projection's kernel
            (`Dense(lora_rank=...)`): the kernel stays frozen and a
            zero-initialised low-rank update trains. Defaults to `None`.

    Input shape:
        `(batch, steps, channels)`, `(batch, height, width, channels)`, or
        `(batch, features)` with `pooling=None`.

    Output shape:
        `(batch, units)`, or `(batch, channels)` (`(batch, prod(dims))` for
        `"flatten"`) without projection.

    Example:

    >>> import numpy as np
    >>> import keras_microtune as kmt
    >>> stage = kmt.layers.EmbeddingStage(pooling="avg", units=4, normalize="l2")
    >>> tuple(stage(np.ones((2, 5, 5, 8), "float32")).shape)
    (2, 4)
    """

    def __init__(
        self,
        pooling="avg",
        units=None,
        activation=None,
        normalize=None,
        lora_rank=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(
                f"Received an invalid value for `pooling`, expected one of {POOLINGS}. "
                f"Received: pooling={pooling!r}"
            )
        if units is not None and (
            isinstance(units, bool) or not isinstance(units, int) or units < 1
        ):
            raise ValueError(
                "Received an invalid value for `units`, expected None or a positive "
                f"integer. Received: units={units!r}"
            )
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                "Received an invalid value for `normalize`, expected one of "
                f"{NORMALIZATIONS}. Received: normalize={normalize!r}"
            )
        self.pooling = pooling
        self.units = units
        self.activation = keras.activations.get(activation)
        self.normalize = normalize
        self.lora_rank = _optional_rank(lora_rank)

    def build(self, input_shape):
        rank = len(input_shape)
        if self.pooling is None and rank != 2:
            raise ValueError(
                "EmbeddingStage with pooling=None expects 2-D (batch, features) "
                f"inputs; use pooling='avg', 'max' or 'flatten' for feature maps. "
                f"Received: input_shape={input_shape}"
            )
        if self.pooling is not None and rank not in (3, 4):
            raise ValueError(
                f"EmbeddingStage with pooling={self.pooling!r} expects 3-D "
                "(batch, steps, channels) or 4-D (batch, height, width, channels) "
                "inputs; use pooling=None for (batch, features) vectors. "
                f"Received: input_shape={input_shape}"
            )
        if self.pooling in ("max", "flatten") and None in input_shape[1:]:
            raise ValueError(
                f"EmbeddingStage with pooling={self.pooling!r} needs static spatial "
                f"dimensions. Received: input_shape={input_shape}"
            )
        self._spatial = tuple(input_shape[1:-1])
        width = self._pooled_width(input_shape)
        if self.units is not None:
            self.projection = keras.layers.Dense(
                self.units,
                activation=self.activation,
                name="projection",
                dtype=self.dtype_policy,
                lora_rank=self.lora_rank,
            )
            self.projection.build((input_shape[0], width))
        # Sublayers made here start trainable; a frozen stage (e.g. one
        # reloaded from `.keras`) must not train them through the model.
        # (Inside build, `self.trainable = ...` does not reach the setter.)
        if not self.trainable:
            keras.layers.Layer.trainable.fset(self, False)

    def _pooled_width(self, input_shape):
        if self.pooling == "flatten":
            dims = input_shape[1:]
            return None if None in dims else math.prod(dims)
        return input_shape[-1]

    def call(self, inputs):
        x = inputs
        if self.pooling == "avg":
            x = ops.mean(x, axis=tuple(range(1, len(x.shape) - 1)))
        elif self.pooling == "max":
            if len(self._spatial) == 1:
                x = ops.expand_dims(x, 2)
                window = (self._spatial[0], 1)
            else:
                window = self._spatial
            x = ops.max_pool(x, pool_size=window, strides=window, padding="valid")
            x = ops.reshape(x, (-1, x.shape[-1]))
        elif self.pooling == "flatten":
            x = ops.reshape(x, (-1, math.prod(self._spatial) * x.shape[-1]))
        if self.units is not None:
            x = self.projection(x)
        if self.normalize == "l2":
            x = l2_normalize(x)
        return x

    def compute_output_shape(self, input_shape):
        width = (
            self.units if self.units is not None else self._pooled_width(input_shape)
        )
        return (input_shape[0], width)

    def get_config(self):
        return {
            **super().get_config(),
            "pooling": self.pooling,
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "normalize": self.normalize,
            "lora_rank": self.lora_rank,
        }
