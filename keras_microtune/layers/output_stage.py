"""OutputStage: the task head."""

import keras

from keras_microtune._api import serializable
from keras_microtune.layers.embedding_stage import _optional_rank

ACTIVATIONS = ("softmax", "sigmoid", "linear", None)


@serializable
class OutputStage(keras.layers.Layer):
    """Task head: dropout, dense layer, output activation.

    Lowers to TFLite FULLY_CONNECTED followed by SOFTMAX or LOGISTIC (nothing
    for `"linear"`); dropout is the identity at inference.

    Args:
        units: int. Number of outputs (classes, or regression targets).
        activation: str or None. `"softmax"`, `"sigmoid"`, `"linear"` or None
            (same as `"linear"`). Defaults to `"softmax"`.
        dropout: float. Dropout rate in [0, 1) applied before the dense layer
            during training. Defaults to `0.0`.
        use_bias: bool. Whether the dense layer has a bias. Defaults to `True`.
        lora_rank: int or None. Keras LoRA on the dense kernel
            (`Dense(lora_rank=...)`). Defaults to `None`.

    Input shape:
        `(batch, features)`.

    Output shape:
        `(batch, units)`.

    Example:

    >>> import numpy as np
    >>> import keras_microtune as kmt
    >>> head = kmt.layers.OutputStage(3)
    >>> probs = head(np.ones((2, 8), "float32"))
    >>> tuple(probs.shape)
    (2, 3)
    """

    def __init__(
        self,
        units,
        activation="softmax",
        dropout=0.0,
        use_bias=True,
        lora_rank=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(
                "Received an invalid value for `units`, expected a positive integer. "
                f"Received: units={units!r}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Received an invalid value for `activation`, expected one of "
                f"{ACTIVATIONS}. Received: activation={activation!r}"
            )
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(
                "Received an invalid value for `dropout`, expected a float in [0, 1). "
                f"Received: dropout={dropout!r}"
            )
        self.units = units
        self.activation = activation
        self.dropout = float(dropout)
        self.use_bias = bool(use_bias)
        self.lora_rank = _optional_rank(lora_rank)
        self.dense = keras.layers.Dense(
            units,
            activation=activation,
            use_bias=self.use_bias,
            name="dense",
            dtype=self.dtype_policy,
            lora_rank=self.lora_rank,
        )
        self.dropout_layer = (
            keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
            if self.dropout
            else None
        )

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                "OutputStage expects 2-D (batch, features) inputs; put an "
                "EmbeddingStage before it to pool feature maps. "
                f"Received: input_shape={input_shape}"
            )
        self.dense.build(input_shape)
        # Sublayers made here start trainable; a frozen stage (e.g. one
        # reloaded from `.keras`) must not train them through the model.
        # (Inside build, `self.trainable = ...` does not reach the setter.)
        if not self.trainable:
            keras.layers.Layer.trainable.fset(self, False)

    def call(self, inputs, training=None):
        x = inputs
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": self.activation,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "lora_rank": self.lora_rank,
        }
