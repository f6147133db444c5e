"""The four stage layers."""

from keras_microtune.layers.embedding_stage import EmbeddingStage
from keras_microtune.layers.feature_stage import FeatureStage
from keras_microtune.layers.microtune import MicroTune
from keras_microtune.layers.output_stage import OutputStage

__all__ = ["EmbeddingStage", "FeatureStage", "MicroTune", "OutputStage"]
