"""Fake-quantization primitives shared by the QAT layers.

Everything here is built on `keras.quantizers.fake_quant_with_min_max_vars`,
which the TFLite converter folds into int8 tensors, so a model that uses these
quantizers converts to full int8 without representative data.

Run-time hooks (used by `kmt.callbacks.QuantizationSchedule`): every quantizer
owns non-trainable scalar variables with fixed names, so a callback can flip
them inside a compiled `fit` without retracing:

- `quant_enabled` (1.0 / 0.0): fake quantization on or off in training
  steps. Off means training computes in float while ranges keep being
  learned; inference (evaluation, prediction, conversion) always simulates
  int8, so validation metrics during a float phase are int8 metrics.
- `range_frozen` (1.0 / 0.0): stop updating the moving-average ranges.

`set_quantization_enabled(model, enabled)` and `freeze_ranges(model, frozen)`
in `keras_microtune.optimize` set them on every quantizer of a model.
"""

import keras
from keras import ops

from keras_microtune._api import serializable

ENABLED = "quant_enabled"
RANGE_FROZEN = "range_frozen"


def flag(layer, name, value, aggregation="none"):
    """Add a float32 scalar run-time flag variable `name` (not trained) to `layer`.

    `aggregation="mean"` for state each replica updates in its train step
    (the activation ranges): under a tf.distribute strategy the replicas'
    updates are averaged, so every replica and worker holds the same value.
    """
    return layer.add_weight(
        name=name,
        shape=(),
        initializer=keras.initializers.Constant(float(value)),
        trainable=False,
        dtype="float32",
        autocast=False,
        aggregation=aggregation,
    )


def quantize_weights(kernel, channel_axis=None, num_bits=8):
    """Symmetric narrow-range fake quantization of a weight tensor.

    The range is `[-max|w|, max|w|]` of the current weights (per channel
    along `channel_axis`, per tensor when it is None), so zeros stay exactly
    zero after int8 conversion. Gradients pass straight through.

    Args:
        kernel: tensor. The float weights.
        channel_axis: int or None. Axis of the output channels for
            per-channel quantization; must be the last axis. Defaults to
            `None` (per tensor).
        num_bits: int. Bit width. Defaults to `8`.
    """
    if channel_axis is None:
        bound = ops.max(ops.abs(kernel))
    else:
        axes = tuple(
            i for i in range(len(kernel.shape)) if i != channel_axis % len(kernel.shape)
        )
        bound = ops.max(ops.abs(kernel), axis=axes)
    bound = ops.stop_gradient(ops.maximum(bound, 1e-8))
    return keras.quantizers.fake_quant_with_min_max_vars(
        kernel, -bound, bound, num_bits=num_bits, narrow_range=True, axis=channel_axis
    )


@serializable
class ActivationQuantizer(keras.layers.Layer):
    """Fake-quantize activations to int8 with a moving-average range.

    While training, the range `[min, max]` follows an exponential moving
    average of each batch's minimum and maximum (the first batch sets it
    directly); at inference the stored range is used. The range always
    contains zero, as TFLite requires.

    Args:
        ema_decay: float. Decay of the moving averages. Defaults to `0.999`.
        fixed_range: tuple of two floats or None. A constant range (for
            outputs whose int8 scale TFLite fixes, e.g. L2 normalisation);
            no moving average is kept. Defaults to `None`.
        num_bits: int. Bit width. Defaults to `8`.

    Call arguments:
        inputs: the activations.
        training: bool. Update the range (and follow the `quant_enabled`
            flag) when True.
        update_when: optional 0/1 scalar tensor; while 0 the range is kept
            (a wrapper's own enabled flag, so the range need not be updated
            inside a conditional branch, which JAX does not allow).

    Example:

    >>> import numpy as np
    >>> from keras_microtune.optimize.quantizers import ActivationQuantizer
    >>> q = ActivationQuantizer()
    >>> y = q(np.linspace(-1, 1, 5, dtype="float32")[None], training=True)
    >>> tuple(y.shape)
    (1, 5)
    """

    def __init__(self, ema_decay=0.999, fixed_range=None, num_bits=8, **kwargs):
        # Fake quantization runs in float32, also under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(
                "Received an invalid value for `ema_decay`, expected a float in "
                f"[0, 1). Received: ema_decay={ema_decay!r}"
            )
        if fixed_range is not None:
            fixed_range = tuple(float(v) for v in fixed_range)
            if len(fixed_range) != 2 or not fixed_range[0] <= 0.0 <= fixed_range[1]:
                raise ValueError(
                    "Received an invalid value for `fixed_range`, expected "
                    "(min, max) with min <= 0 <= max. "
                    f"Received: fixed_range={fixed_range!r}"
                )
        self.ema_decay = float(ema_decay)
        self.fixed_range = fixed_range
        self.num_bits = int(num_bits)

    def build(self, input_shape):
        low, high = self.fixed_range or (-6.0, 6.0)
        # Each replica's EMA of its own batches, averaged over the replicas:
        # MultiWorkerMirroredStrategy workers would otherwise drift apart.
        self.range_min = flag(self, "range_min", low, aggregation="mean")
        self.range_max = flag(self, "range_max", high, aggregation="mean")
        self.range_initialized = flag(self, "range_initialized", 0.0)
        self.enabled = flag(self, ENABLED, 1.0)
        self.frozen = flag(self, RANGE_FROZEN, 0.0)

    def _update_range(self, x, update_when=None):
        batch_min = ops.minimum(ops.min(x), 0.0)
        batch_max = ops.maximum(ops.max(x), 0.0)
        d = self.ema_decay
        init = self.range_initialized.value
        keep = self.frozen.value
        if update_when is not None:  # A 0/1 flag: keep the range while 0.
            keep = ops.maximum(keep, 1.0 - ops.cast(update_when, "float32"))
        for var, batch in ((self.range_min, batch_min), (self.range_max, batch_max)):
            ema = d * var + (1.0 - d) * batch
            new = init * ema + (1.0 - init) * batch
            var.assign(keep * var + (1.0 - keep) * ops.stop_gradient(new))
        self.range_initialized.assign(ops.maximum(init, 1.0 - keep))

    def call(self, inputs, training=None, update_when=None):
        x = ops.cast(inputs, "float32")
        if training and self.fixed_range is None:
            self._update_range(x, update_when)
        low = ops.minimum(self.range_min, 0.0)
        high = ops.maximum(self.range_max, low + 1e-6)

        def quantized():
            return keras.quantizers.fake_quant_with_min_max_vars(
                x, low, high, num_bits=self.num_bits
            )

        # Inference (and so conversion) always simulates int8; the flag
        # switches training steps between fake-quant and float.
        out = (
            ops.cond(self.enabled > 0.5, quantized, lambda: x)
            if training
            else quantized()
        )
        return ops.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "ema_decay": self.ema_decay,
            "fixed_range": self.fixed_range,
            "num_bits": self.num_bits,
        }
