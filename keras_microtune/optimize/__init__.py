"""Quantization-aware training, pruning and clustering for Keras 3.

Keras 3 models get native fake-quant QAT and magnitude pruning; tf_keras
models are routed to tensorflow-model-optimization with the same call.

Public API:
- `quantize_model(model, unsupported="raise", preserve_sparsity=True)`
- `prune_low_magnitude(model, target_sparsity=0.5, begin_step=0,
  end_step=1000, frequency=100, power=3)`
- `strip(model)`: remove pruning wrappers (QAT layers stay: the converter
  needs them to produce int8).

Hooks for schedules (`kmt.callbacks`): `set_quantization_enabled`,
`freeze_ranges`, `freeze_batch_norm`, `update_pruning_masks`,
`pruning_summary`, and the `pruning_step` variable of `PruneLowMagnitude`.
Clustering (`cluster_weights`, `strip_clustering`) will live in
`optimize/cluster.py`.
"""

from keras_microtune.optimize.hooks import (
    freeze_batch_norm,
    freeze_ranges,
    set_quantization_enabled,
)
from keras_microtune.optimize.prune import (
    PruneLowMagnitude,
    prune_low_magnitude,
    pruning_summary,
    strip,
    update_pruning_masks,
)
from keras_microtune.optimize.quantize import QUANTIZE_REGISTRY, quantize_model
from keras_microtune.optimize.quantize_conv import QuantizeConv
from keras_microtune.optimize.quantize_stages import QuantizedMicroTune
from keras_microtune.optimize.quantizers import ActivationQuantizer

__all__ = [
    "QUANTIZE_REGISTRY",
    "ActivationQuantizer",
    "PruneLowMagnitude",
    "QuantizeConv",
    "QuantizedMicroTune",
    "freeze_batch_norm",
    "freeze_ranges",
    "prune_low_magnitude",
    "pruning_summary",
    "quantize_model",
    "set_quantization_enabled",
    "strip",
    "update_pruning_masks",
]
