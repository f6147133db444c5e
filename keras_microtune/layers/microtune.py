"""MicroTune: a grouped, optionally low-rank residual adapter."""

import keras
from keras import ops

from keras_microtune._api import serializable

MERGES = ("concat", "sum")


@serializable
class MicroTune(keras.layers.Layer):
    """Parameter-efficient residual adapter acting on the last axis.

    The last axis (width `d`) is split into `groups` slices of width
    `g = d / groups`. The branch applies `activation` to the input, maps each
    slice with its own `g x g` matrix (or, with `rank`, a `g x rank` then
    `rank x g` pair), merges the group results and adds a bias. The output is
    `inputs + branch`. The branch is zero at initialisation (the full-rank
    kernels, or the second low-rank factor, start at zero), so attaching the
    layer to a trained model leaves its outputs unchanged until it is trained.

    Merge modes:
    - `"concat"`: output slice `i` is `W_i x_i` (a block-diagonal map).
    - `"sum"`: output slice `i` is `W_i (x_1 + ... + x_groups)`, so every
      output slice sees every input slice for the same parameter count.

    Trainable parameters: `d * d / groups + d` at full rank,
    `2 * d * rank + d` with `rank` (plus nothing else).

    Args:
        groups: int. Number of slices of the last axis; must divide its width.
            Defaults to `4`.
        rank: int or None. Rank of each group's map; None for full rank.
            Defaults to `None`.
        merge: str. `"concat"` or `"sum"`. Defaults to `"concat"`.
        activation: str or None. Activation applied to the branch input
            (e.g. `"relu"`). Defaults to `None`.
        use_bias: bool. Whether the branch adds a bias. Defaults to `True`.
        kernel_initializer: Initializer of the first low-rank factor (unused
            at full rank, where kernels start at zero). Defaults to
            `"glorot_uniform"`.
        kernel_regularizer: Optional regularizer for the kernels.

    Input shape:
        Tensor of any rank >= 2 with a known last dimension `d`.

    Output shape:
        Same as the input.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_microtune as kmt
    >>> layer = kmt.layers.MicroTune(groups=2)
    >>> x = np.ones((1, 8), "float32")
    >>> bool(np.array_equal(keras.ops.convert_to_numpy(layer(x)), x))
    True
    """

    def __init__(
        self,
        groups=4,
        rank=None,
        merge="concat",
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(
                "Received an invalid value for `groups`, expected a positive "
                f"integer. Received: groups={groups!r}"
            )
        if rank is not None and (
            isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
        ):
            raise ValueError(
                "Received an invalid value for `rank`, expected None or a "
                f"positive integer. Received: rank={rank!r}"
            )
        if merge not in MERGES:
            raise ValueError(
                f"Received an invalid value for `merge`, expected one of {MERGES}. "
                f"Received: merge={merge!r}"
            )
        self.groups = groups
        self.rank = rank
        self.merge = merge
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                "MicroTune expects inputs of rank >= 2 (batch, ..., features). "
                f"Received: input_shape={input_shape}"
            )
        width = input_shape[-1]
        if width is None:
            raise ValueError(
                "MicroTune needs a known last dimension. "
                f"Received: input_shape={input_shape}"
            )
        if width % self.groups:
            divisors = [g for g in range(1, width + 1) if width % g == 0]
            raise ValueError(
                "Received an invalid value for `groups`, expected a positive "
                f"divisor of the input width {width} (one of {divisors}). "
                f"Received: groups={self.groups}"
            )
        g = width // self.groups
        if self.rank is None:
            self.kernel = self.add_weight(
                name="kernel",
                shape=(self.groups, g, g),
                initializer="zeros",
                regularizer=self.kernel_regularizer,
            )
        else:
            self.kernel_down = self.add_weight(
                name="kernel_down",
                shape=(self.groups, g, self.rank),
                initializer=self.kernel_initializer,
                regularizer=self.kernel_regularizer,
            )
            self.kernel_up = self.add_weight(
                name="kernel_up",
                shape=(self.groups, self.rank, g),
                initializer="zeros",
                regularizer=self.kernel_regularizer,
            )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(width,), initializer="zeros"
            )
        else:
            self.bias = None

    # The pieces of `call`; QuantizedMicroTune overrides them to add
    # fake quantization at the points the int8 model has tensors.
    def _branch_input(self, inputs):
        return self.activation(inputs)

    def _sum(self, slices):
        total = slices[0]
        for s in slices[1:]:
            total = total + s
        return total

    def _group_map(self, x, i):
        """Group `i`'s map, with its slice of the bias (-> one FULLY_CONNECTED)."""
        if self.rank is None:
            y = ops.matmul(x, self.kernel[i])
        else:
            y = ops.matmul(ops.matmul(x, self.kernel_down[i]), self.kernel_up[i])
        if self.bias is None:
            return y
        width = self.bias.shape[0] // self.groups
        return y + self.bias[i * width : (i + 1) * width]

    def _output(self, outputs):
        return outputs

    def call(self, inputs):
        x = self._branch_input(inputs)
        if self.groups == 1:
            branch = self._group_map(x, 0)
        else:
            slices = ops.split(x, self.groups, axis=-1)
            if self.merge == "sum":
                slices = [self._sum(slices)] * self.groups
            branch = ops.concatenate(
                [self._group_map(s, i) for i, s in enumerate(slices)], axis=-1
            )
        return self._output(inputs + branch)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "groups": self.groups,
            "rank": self.rank,
            "merge": self.merge,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
        }
