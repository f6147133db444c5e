"""PrefixCacheModel: a Functional model whose `fit` computes a frozen prefix once.

`kmt.attach()` returns this class. When a long frozen prefix precedes the
first trainable layer and `fit` gets array data (NumPy arrays, tensors, or
lists/dicts of them), `fit` runs the prefix once over the training (and
validation) inputs and trains on its outputs, the *features*; the prefix
does not run in the training steps. Everything else is Keras' own `fit`.

How (and why this way). `fit` calls `keras.Model.fit` with the features
under reserved keys of a dict in place of `x`. Keras then does all it does
for any model: callbacks bound to this full model (History, Progbar,
EarlyStopping with `restore_best_weights`, ModelCheckpoint, BackupAndRestore,
`stop_training`, learning-rate schedules, the kmt callbacks), `class_weight`,
metrics, and the returned History. The only hook is `__call__`: when Keras'
train/test step calls `self(x)` on a features dict, the call goes to a
*suffix* model built from the cut tensors with the same layer objects, so
gradients, optimizer updates and metrics reach the same variables. Any other
input (raw arrays in `predict`, `evaluate`, a callback converting the model
mid-fit) takes the normal path, so no state is switched around `fit` and no
Keras private method is overridden. (The alternative, the suffix's own `fit`
with the callbacks bound to this model, would need `stop_training`, History
and `model.history` forwarded by hand.)

Keras builds a new `tf.data` iterator over arrays at every epoch, which on a
small cached dataset costs more than the steps; so the features go in as one
repeating dataset with `steps_per_epoch` batches (`feature_data.py`), with
`validation_split` split as Keras splits it (the last samples). With
`shuffle=False` the batches and so the trained weights equal the plain
`fit`'s (float tolerance); with `shuffle=True` batches are reshuffled each
epoch by TensorFlow's seeded shuffle: reproducible under
`keras.utils.set_random_seed`, but not the plain `fit`'s order. When the user
passes `steps_per_epoch` or `class_weight`, the features go through Keras'
own array batching instead (its order, also when shuffled, but an iterator
per epoch). Array data that is not cached (no prefix to cache, or a
fallback below) is fed the same way, up to `max_cache_bytes`. Before
training, the optimizer, loss and metric variables are built from one
batch's shapes, so Keras traces the train step once instead of twice.
Together these halve `fit`'s time on the small transfer tasks (about 8.8 s
to 4.2 s for 40 epochs of the digits task, `BENCHMARKS.md`).

Falls back to the plain `fit` (said once per call, in the `logging` module
and, at `verbose` > 0, on stdout) when: `cache_prefix=False`; `x` is not
arrays (tf.data, generators, PyDataset, sparse/ragged); the prefix has random
or training-dependent layers before anything worth caching (Dropout, noise,
random augmentation, BatchNorm with batch statistics, QAT/pruning wrappers
whose state updates in training, custom layers taking `training`); the
prefix computes under `MIN_PREFIX_FRACTION` of the model's multiply-adds;
the features would exceed `max_cache_bytes` (default 1 GiB, summed over the
training and validation features); a callback changes frozen layers during
fit (ProgressiveUnfreeze, ActivationClipAnneal); or the prefix adds losses.
A callback that makes a prefix layer trainable mid-fit stops it with an
error. `evaluate` and `predict` always run the whole model.

Saving and resuming. The config keeps which variables train
(`trainable_paths`), so a model from `keras.saving.load_model` trains what
the saved one trained. Keras saves each LoRA kernel merged (`W + A @ B`)
and loads it back with both factors zero, which would stop them training
(zero gradients) and lose the factors Adam's saved moments belong to. So
this model also saves every LoRA layer's frozen kernel and both factors in
its own entry of the weights file (`.keras`, `.weights.h5`; keys starting
with `LORA_STATE_KEY`), and after `load_weights` (which `BackupAndRestore`
and `ModelCheckpoint` resumes use) and at the start of `fit` puts them back
exactly where the layer still holds what was loaded (the merged kernel,
zero factors): a resumed fit then continues as the uninterrupted one would
(logged once at INFO). A file without that entry (saved by another model
class, or before this) gets the fallback: A drawn again as `enable_lora`
draws it and B kept zero (`kmt.adapters.restart_lora`), so outputs are
unchanged and training continues from the merged kernel with a fresh
low-rank update, which is not the uninterrupted run.
"""

import logging
import sys

import keras
import numpy as np

from keras_microtune._api import serializable, strategy_scope, sublayers
from keras_microtune.adapters import restart_lora
from keras_microtune.training import feature_data
from keras_microtune.training.prefix_plan import plan_prefix

logger = logging.getLogger(__name__)
FEATURE_KEY = "keras_microtune_prefix_features_"
MIN_PREFIX_FRACTION = 0.2
DEFAULT_MAX_CACHE_BYTES = 2**30
# Weights-file keys of the exact LoRA state (kernel, A, B) of each LoRA layer.
LORA_STATE_KEY = "keras_microtune_lora:"
LORA_PARTS = ("kernel", "a", "b")


def _is_features(x):
    return (
        isinstance(x, dict)
        and bool(x)
        and all(isinstance(k, str) and k.startswith(FEATURE_KEY) for k in x)
    )


def _pack(features):
    features = features if isinstance(features, list) else [features]
    return {f"{FEATURE_KEY}{i:03d}": f for i, f in enumerate(features)}


def _unpack(x):
    values = [x[f"{FEATURE_KEY}{i:03d}"] for i in range(len(x))]
    return values[0] if len(values) == 1 else values


def _is_arrays(x):
    """True for NumPy arrays, dense tensors, and lists/dicts/tuples of them."""
    tf = sys.modules.get("tensorflow")  # Only TensorFlow's can be sparse/ragged.
    leaves = keras.tree.flatten(x)
    if not leaves:
        return False
    for leaf in leaves:
        if tf is not None and isinstance(leaf, (tf.SparseTensor, tf.RaggedTensor)):
            return False
        if not (hasattr(leaf, "shape") and hasattr(leaf, "__array__")):
            return False
    return True


class _Cache:
    """Plain holder (not tracked by Keras, not saved) for the suffix model."""

    def __init__(self):
        self.key = None
        self.suffix = None
        self.saved_lora = {}  # weights-file key -> array, until put back


@serializable
class PrefixCacheModel(keras.Model):
    """A Functional model whose `fit` computes its frozen prefix only once.

    Construct it like a Functional model; see the module docstring for what
    `fit` caches and when it falls back to the plain path.

    Args:
        *args: the Functional model arguments (`inputs`, `outputs`, `name`).
        cache_prefix: bool. Cache the frozen prefix in `fit`. Defaults to
            `True`.
        max_cache_bytes: int. Largest features cache (training plus
            validation) `fit` builds. Defaults to `2**30` (1 GiB).
        trainable_paths: None or list of str. Variables to flag trainable,
            by path from their top-level layer ("b1/block0_pw/lora_kernel_a"),
            as `get_config` records them, so a reloaded model trains what the
            saved one did. Defaults to `None` (the flags the layers give).
        **kwargs: passed to `keras.Model`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> backbone = keras.Sequential([
    ...     keras.Input((16, 3)),
    ...     kmt.layers.FeatureStage([8, 16], name="features"),
    ...     kmt.layers.EmbeddingStage(),
    ...     kmt.layers.OutputStage(5),
    ... ])
    >>> model = kmt.attach(backbone, num_classes=3)
    >>> type(model).__name__
    'PrefixCacheModel'
    """

    def __init__(
        self,
        *args,
        cache_prefix=True,
        max_cache_bytes=DEFAULT_MAX_CACHE_BYTES,
        trainable_paths=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(cache_prefix, bool):
            raise TypeError(
                "Received an invalid value for `cache_prefix`, expected True or "
                f"False. Received: cache_prefix={cache_prefix!r}"
            )
        if (
            isinstance(max_cache_bytes, bool)
            or not isinstance(max_cache_bytes, int)
            or max_cache_bytes < 0
        ):
            raise ValueError(
                "Received an invalid value for `max_cache_bytes`, expected a "
                f"non-negative integer. Received: max_cache_bytes={max_cache_bytes!r}"
            )
        self.cache_prefix = cache_prefix
        self.max_cache_bytes = max_cache_bytes
        self._prefix_cache = _Cache()
        if trainable_paths is not None:
            self._flag_trainable(trainable_paths)

    def _flag_trainable(self, paths):
        if not isinstance(paths, (list, tuple)) or not all(
            isinstance(p, str) for p in paths
        ):
            raise TypeError(
                "Received an invalid value for `trainable_paths`, expected a list "
                f"of variable paths. Received: trainable_paths={paths!r}"
            )
        variables = _variables_by_path(self)
        unknown = sorted(set(paths) - set(variables))
        if unknown:
            raise ValueError(
                "Received an invalid value for `trainable_paths`: the model has "
                f"no variables {unknown}. Pass paths from `variable.path` of "
                "this model's layers (as `get_config` records them)."
            )
        for path in paths:
            variables[path].trainable = True

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras' `load_weights`, then the saved LoRA state put back (module docs)."""
        super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        self._restart_lora()

    def save_own_variables(self, store):
        """Keras' own variables, plus each LoRA layer's kernel and factors."""
        super().save_own_variables(store)
        for path, layer in _lora_layers(self).items():
            for part, variable in zip(LORA_PARTS, _lora_state(layer)):
                store[_lora_key(path, part)] = variable

    def load_own_variables(self, store):
        """Keras' own variables; the LoRA state waits until the layers loaded."""
        keys = list(store.keys())
        lora = [k for k in keys if k.startswith(LORA_STATE_KEY)]
        super().load_own_variables({k: store[k] for k in keys if k not in lora})
        self._prefix_cache.saved_lora = {k: np.asarray(store[k]) for k in lora}

    def _restore_lora(self):
        """Put back the saved LoRA state where a layer holds what Keras loaded."""
        saved, self._prefix_cache.saved_lora = self._prefix_cache.saved_lora, {}
        restored = []
        for path, layer in _lora_layers(self).items():
            keys = [_lora_key(path, part) for part in LORA_PARTS]
            if not all(k in saved for k in keys):
                continue
            kernel, a, b = (saved[k] for k in keys)
            current = [keras.ops.convert_to_numpy(v) for v in _lora_state(layer)]
            merged = kernel + (layer.lora_alpha / layer.lora_rank) * np.matmul(a, b)
            loaded = (
                not current[1].any()
                and not current[2].any()
                and current[0].shape == kernel.shape
                and np.allclose(current[0], merged, rtol=1e-5, atol=1e-6)
            )
            if loaded:
                for variable, value in zip(_lora_state(layer), (kernel, a, b)):
                    variable.assign(value)
                restored.append(layer.name)
        return restored

    def _restart_lora(self):
        restored = self._restore_lora()
        if restored:
            logger.info(
                "Restored the saved LoRA factors and frozen kernels of %d layers "
                "exactly (Keras loads them merged with both factors zero): %s",
                len(restored),
                restored,
            )
        restarted = restart_lora(self)
        if restarted:
            logger.info(
                "Loaded %d LoRA layers with both factors zero (Keras saves them "
                "merged into the kernel); re-initialised their A factor so they "
                "keep training, B stays zero so outputs are unchanged: %s",
                len(restarted),
                [layer.name for layer in restarted],
            )

    def __call__(self, *args, **kwargs):
        if args and _is_features(args[0]):
            suffix = self._prefix_cache.suffix
            if suffix is None:
                raise ValueError(
                    "Received cached prefix features outside a cached `fit`. "
                    f"Keys starting with {FEATURE_KEY!r} are reserved; pass the "
                    "model's own inputs instead."
                )
            return suffix(_unpack(args[0]), *args[1:], **kwargs)
        return super().__call__(*args, **kwargs)

    def call(self, inputs, training=None, mask=None, **kwargs):
        # JAX's trainer calls `call` (through `stateless_call`), not `__call__`.
        if _is_features(inputs) and self._prefix_cache.suffix is not None:
            return self._prefix_cache.suffix(_unpack(inputs), training=training)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "cache_prefix": self.cache_prefix,
            "max_cache_bytes": self.max_cache_bytes,
            "trainable_paths": [
                path for path, v in _variables_by_path(self).items() if v.trainable
            ],
        }

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        validation_steps=None,
        validation_batch_size=None,
        validation_freq=1,
    ):
        """Keras' `fit`, computing the frozen prefix once for array inputs."""
        args = dict(locals())
        args.pop("self")
        args.pop("__class__", None)
        self._restart_lora()
        plan, reason = self._plan_cache(x, validation_data, callbacks)
        if reason is None:
            batch_size = batch_size or 32
            train, validation, reason = self._features(plan, args, batch_size)
        if reason is not None:
            self._say(verbose, f"Prefix cache off, training the whole model: {reason}.")
            return self._fit_arrays(args)
        self._say(
            verbose,
            f"Prefix cache: computed {len(plan.layers)} frozen layers once "
            f"({plan.fraction:.0%} of the multiply-adds); training the rest.",
        )
        guard = _PrefixGuard(plan.layers)
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks.append(guard)
        else:
            args["callbacks"] = [*(callbacks or []), guard]
        return self._fit_fed(args, train, validation)

    def _fit_arrays(self, args):
        """The uncached `fit`: array data through `_fit_fed` (one iterator,
        one trace) when it fits `max_cache_bytes`, else Keras' own `fit`."""
        x, validation = args["x"], args["validation_data"]
        arrays = x is not None and _is_arrays(x)
        if arrays and validation is not None:
            # A dataset or generator validates as Keras does.
            arrays = isinstance(validation, tuple) and _is_arrays(validation)
        if arrays:
            size = _nbytes((x, args["y"], args["sample_weight"]))
            if isinstance(validation, tuple):
                size += _nbytes(validation)
            arrays = size <= self.max_cache_bytes
        if not arrays:
            return super().fit(**args)
        args["batch_size"] = args["batch_size"] or 32
        return self._fit_fed(args, *_split(args))

    def _fit_fed(self, args, train, validation):
        """Keras' `fit` on `train` = `(x, y, sample_weight)` arrays (prefix
        features or the model's inputs) and `validation` (arrays or the
        user's own), fed as one repeating dataset.

        Two costs of Keras' array `fit` are avoided, neither changing what is
        trained: a new `tf.data` iterator per epoch (see `feature_data`), and
        tracing the train step twice (without a distribution strategy Keras
        builds the optimizer and metric variables inside the first trace, so
        `tf.function` traces again). The optimizer, loss and metrics are built
        first from one batch's shapes, as Keras does under a strategy.
        """
        batch_size = args["batch_size"]
        args.update(validation_split=0.0, sample_weight=None)
        if validation is not None:
            args["validation_data"] = validation
        self._build_for_training(train, batch_size)
        if (
            args["steps_per_epoch"] is not None
            or args["class_weight"] is not None
            or (train[1] is None and train[2] is not None)
        ):
            # Keras' own array batching (one iterator per epoch or two).
            args.update(x=train[0], y=train[1], sample_weight=train[2])
            return super().fit(**args)
        dataset, steps = feature_data.training_dataset(
            *train, batch_size, args["shuffle"]
        )
        if isinstance(validation, tuple):
            validation = feature_data.evaluation_dataset(
                *validation, args["validation_batch_size"] or batch_size
            )
            args.update(validation_data=validation, validation_batch_size=None)
        args.update(x=dataset, y=None, batch_size=None, shuffle=False)
        return super().fit(**{**args, "steps_per_epoch": steps})

    def _build_for_training(self, train, batch_size):
        """Build the optimizer, loss and metric state from one batch's shapes
        (Keras' `_symbolic_build`), so the train step is traced once. Only a
        speed-up: skipped where this Keras has no such method."""
        build = getattr(self, "_symbolic_build", None)
        if build is None or self.optimizer is None or self.optimizer.built:
            return
        batch = keras.tree.map_structure(
            lambda a: None if a is None else a[:batch_size], train
        )
        with strategy_scope(self):
            build(data_batch=batch)

    def _say(self, verbose, message):
        logger.info(message)
        if verbose != 0:
            print(message, flush=True)

    def _plan_cache(self, x, validation, callbacks):
        """(plan, reason): reason is why not to cache, None to cache."""
        from keras_microtune.callbacks import ActivationClipAnneal, ProgressiveUnfreeze

        if not self.cache_prefix:
            return None, "cache_prefix=False"
        if x is None or not _is_arrays(x):
            return None, (
                f"x is a {type(x).__name__}, not arrays (only NumPy arrays, "
                "tensors and lists/dicts of them are cached)"
            )
        for callback in list(callbacks or []):
            if isinstance(callback, (ProgressiveUnfreeze, ActivationClipAnneal)):
                return None, (
                    f"the {type(callback).__name__} callback changes frozen layers "
                    "during fit"
                )
        plan = plan_prefix(self)
        stops = f" (the prefix stops at: {'; '.join(plan.stops)})" if plan.stops else ""
        if plan.reason is not None:
            return plan, plan.reason + stops
        if plan.fraction < MIN_PREFIX_FRACTION:
            return plan, (
                f"the frozen prefix is too short to matter ({plan.fraction:.0%} of "
                f"the multiply-adds, needs {MIN_PREFIX_FRACTION:.0%}){stops}"
            )
        size = _rows(x) * _row_bytes(plan.cut)
        if validation is not None and _is_arrays(validation):
            val_x = keras.utils.unpack_x_y_sample_weight(validation)[0]
            size += _rows(val_x) * _row_bytes(plan.cut)
        if size > self.max_cache_bytes:
            return plan, (
                f"the features would take {size / 2**20:.0f} MiB, over "
                f"max_cache_bytes={self.max_cache_bytes}"
            )
        return plan, None

    def _features(self, plan, args, batch_size):
        """(train, validation, reason): arrays with the prefix run once.

        `train` is `(features, y, sample_weight)`; `validation` the same for
        array validation data (split as Keras splits `validation_split`), the
        user's `validation_data` otherwise; `reason` says why not to cache.
        """
        key = tuple(id(t) for t in plan.cut)
        cut = plan.cut if len(plan.cut) > 1 else plan.cut[0]
        with strategy_scope(self):
            prefix = keras.Model(self.input, cut, name=f"{self.name}_prefix")
            if self._prefix_cache.key != key:
                self._prefix_cache.suffix = keras.Model(
                    cut, self.output, name=f"{self.name}_suffix"
                )
                self._prefix_cache.key = key
        train, validation = _split(args)

        def run(arrays, size):
            features = feature_data.prefix_features(prefix, arrays[0], size)
            return (_pack(features), *arrays[1:])

        train = run(train, batch_size)
        if isinstance(validation, tuple):
            validation = run(validation, args["validation_batch_size"] or batch_size)
        if prefix.losses:
            return None, None, "the frozen prefix adds losses (add_loss)"
        return train, validation, None


def _split(args):
    """`fit`'s arrays as `(train, validation)`: `train` is `(x, y,
    sample_weight)`; `validation_split` splits as Keras does, array
    `validation_data` is unpacked the same way, anything else is kept."""
    train = (args["x"], args["y"], args["sample_weight"])
    validation = args["validation_data"]
    if args["validation_split"] and validation is None:
        return feature_data.split_validation(train, args["validation_split"])
    if validation is not None and _is_arrays(validation):
        validation = keras.utils.unpack_x_y_sample_weight(validation)
    return train, validation


def _variables_by_path(model):
    """{path from the top-level layer: variable} of `model`'s layers.

    Keras' `variable.path` also names the model a layer was first built in
    ("backbone/b1/..."), which a reloaded model does not have.
    """
    variables = {}
    for layer in model.layers:
        for variable in layer.weights:
            parts = variable.path.split("/")
            if layer.name in parts:
                parts = parts[parts.index(layer.name) :]
            else:
                parts = [layer.name, variable.name]
            variables["/".join(parts)] = variable
    return variables


def _lora_layers(model):
    """{path of the layer from its top-level layer: layer} of LoRA layers."""
    by_factor = {
        id(layer.lora_kernel_a): layer
        for layer in sublayers(model)
        if getattr(layer, "lora_enabled", False)
    }
    return {
        path.rpartition("/")[0]: by_factor[id(variable)]
        for path, variable in _variables_by_path(model).items()
        if id(variable) in by_factor
    }


def _lora_state(layer):
    # Keras keeps the frozen kernel in `_kernel`; `kernel` adds A @ B to it.
    return layer._kernel, layer.lora_kernel_a, layer.lora_kernel_b


def _lora_key(path, part):
    return f"{LORA_STATE_KEY}{path.replace('/', ':')}:{part}"


def _rows(x):
    return int(keras.tree.flatten(x)[0].shape[0])


def _nbytes(arrays):
    return sum(
        int(np.prod(a.shape))
        * np.dtype(keras.backend.standardize_dtype(a.dtype)).itemsize
        for a in keras.tree.flatten(arrays)
        if a is not None
    )


def _row_bytes(cut):
    return sum(
        int(np.prod([d or 1 for d in t.shape[1:]])) * np.dtype(t.dtype).itemsize
        for t in cut
    )


class _PrefixGuard(keras.callbacks.Callback):
    """Stop a cached fit with a clear error if a prefix layer becomes trainable."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def on_epoch_begin(self, epoch, logs=None):
        changed = [layer.name for layer in self.layers if layer.trainable_weights]
        if changed:
            raise RuntimeError(
                f"Layers {changed} of the cached frozen prefix became trainable "
                "during fit, so their cached outputs are stale. Set "
                "`model.cache_prefix = False` before fit to train them."
            )
