"""Quantization-aware training, pruning and clustering for Keras 3."""
