"""keras_microtune: microtune Keras 3 models and ship verified int8 TFLite.

Importing the package imports Keras (and so TensorFlow) but not LiteRT,
TFLite Micro or Vela: those load on first use of the export functions.
"""

from keras_microtune import callbacks, layers, optimize
from keras_microtune._api import KerasMicrotuneWarning
from keras_microtune.attach import attach
from keras_microtune.layers import EmbeddingStage, FeatureStage, MicroTune, OutputStage

__version__ = "0.1.0"

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
]
