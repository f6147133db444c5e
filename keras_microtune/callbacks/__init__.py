"""Callbacks that adjust a fine-tuning parameter during `model.fit`."""

from keras_microtune.callbacks.activation_clip_anneal import ActivationClipAnneal
from keras_microtune.callbacks.device_budget import DeviceBudget
from keras_microtune.callbacks.distillation_schedule import DistillationSchedule
from keras_microtune.callbacks.progressive_unfreeze import ProgressiveUnfreeze
from keras_microtune.callbacks.pruning_schedule import PruningSchedule
from keras_microtune.callbacks.quantization_schedule import QuantizationSchedule
from keras_microtune.callbacks.warmup_cosine import WarmupCosine

__all__ = [
    "ActivationClipAnneal",
    "DeviceBudget",
    "DistillationSchedule",
    "ProgressiveUnfreeze",
    "PruningSchedule",
    "QuantizationSchedule",
    "WarmupCosine",
]
