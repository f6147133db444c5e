"""Callbacks that adjust a fine-tuning parameter during `model.fit`."""
