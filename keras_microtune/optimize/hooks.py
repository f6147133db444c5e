"""Run-time hooks for QAT schedules (`kmt.callbacks.QuantizationSchedule`).

Each hook assigns named non-trainable variables on every quantizer of a
model (nested models included), so it works inside a running `fit` without
retracing the train function. Each returns how many variables it set.

- `set_quantization_enabled(model, enabled)`: fake quant on/off in training
  steps (inference always simulates int8).
- `freeze_ranges(model, frozen)`: stop/resume moving-average range updates.
- `freeze_batch_norm(model, frozen)`: folded BatchNorms use their moving
  statistics (frozen) or batch statistics (while training).
"""

from keras_microtune.optimize.quantize_conv import BN_FROZEN
from keras_microtune.optimize.quantizers import ENABLED, RANGE_FROZEN


def _set_flags(model, name, value):
    count = 0
    for variable in model.variables:
        if variable.name == name:
            variable.assign(float(value))
            count += 1
    return count


def set_quantization_enabled(model, enabled=True):
    """Turn fake quantization on or off in every quantizer; returns the count."""
    return _set_flags(model, ENABLED, bool(enabled))


def freeze_ranges(model, frozen=True):
    """Stop (or resume) updating activation ranges; returns the count."""
    return _set_flags(model, RANGE_FROZEN, bool(frozen))


def freeze_batch_norm(model, frozen=True):
    """Use (or stop using) moving BatchNorm statistics in folded layers."""
    return _set_flags(model, BN_FROZEN, bool(frozen))
