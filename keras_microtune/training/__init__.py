"""Training helpers: `PrefixCacheModel`, the model class `kmt.attach()` returns."""

from keras_microtune.training.prefix_cache import PrefixCacheModel

__all__ = ["PrefixCacheModel"]
