"""keras_microtune: microtune Keras 3 models and ship verified int8 TFLite.

Importing the package imports Keras (and so TensorFlow) but not LiteRT,
TFLite Micro or Vela: the export functions load them on first use.
"""

import importlib

from keras_microtune import callbacks, layers, optimize
from keras_microtune._api import KerasMicrotuneWarning
from keras_microtune.attach import attach
from keras_microtune.layers import EmbeddingStage, FeatureStage, MicroTune, OutputStage

__version__ = "0.1.0"

# Public names resolved on first access: name -> (module, attribute or None).
_LAZY = {
    "convert": ("keras_microtune.export.converter", "convert"),
    "ConversionResult": ("keras_microtune.export.converter", "ConversionResult"),
    "inspect": ("keras_microtune.export.inspect", "inspect"),
    "evaluate": ("keras_microtune.export.evaluate", "evaluate"),
    "targets": ("keras_microtune.export.targets", None),
    "data": ("keras_microtune.data", None),
    "losses": ("keras_microtune.losses", None),
    "placement_report": ("keras_microtune.placement", "placement_report"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'keras_microtune' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


__all__ = [
    "EmbeddingStage",
    "FeatureStage",
    "KerasMicrotuneWarning",
    "MicroTune",
    "OutputStage",
    "attach",
    "callbacks",
    "layers",
    "optimize",
    *_LAZY,
]
