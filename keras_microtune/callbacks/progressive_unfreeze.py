"""ProgressiveUnfreeze: unfreeze backbone blocks from the top, by epoch."""

import keras

from keras_microtune._api import strategy_scope
from keras_microtune.callbacks._base import (
    base_optimizer,
    check_number,
    require_compiled,
    retrace,
    sublayers,
)


def _is_batchnorm(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def _top_level_layers(model):
    """Layers of `model`, with nested models (backbones) expanded."""
    result = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            result.extend(_top_level_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            result.append(layer)
    return result


class ProgressiveUnfreeze(keras.callbacks.Callback):
    """Unfreeze frozen backbone blocks from the top (output side), by epoch.

    Block `i`, counted from the top, becomes trainable at the start of epoch
    `unfreeze_epochs[i]`. BatchNormalization layers inside a block stay frozen,
    and so in inference mode, unless `train_batchnorm=True` (the usual
    fine-tuning recipe: batch statistics of a small dataset would spoil them).

    Keras compiles the train step once per `fit`, and the optimizer only
    updates the variables it was built with. This callback therefore rebuilds
    the optimizer once, when training begins, over every variable it may
    unfreeze (its state is copied over by variable name), and retraces the
    train and test functions whenever the set of trainable layers changes.
    The optimizer keeps the same variables throughout, so `BackupAndRestore`
    and `ModelCheckpoint` save and restore a consistent state; on resume the
    unfrozen blocks are recomputed from the epoch index.

    The number of unfrozen blocks goes into the epoch `logs` as
    `"unfrozen_blocks"`.

    Args:
        unfreeze_epochs: list of int. Epoch at which each block is unfrozen,
            first the top block. Non-decreasing.
        blocks: `"auto"` or a list of blocks, top first, each a layer name or
            a list of layer names (searched in nested models too). `"auto"`
            takes each frozen layer that has weights, except BatchNorm layers,
            with nested models expanded into their layers. Defaults to
            `"auto"`.
        learning_rate_multiplier: float. Factor on the learning rate of the
            unfrozen layers' weights (for example `0.1`), applied inside the
            optimizer's update step. Defaults to `1.0`.
        train_batchnorm: bool. Also unfreeze BatchNorm layers of the blocks
            (they then use batch statistics in training). Defaults to `False`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> backbone = keras.layers.Dense(8, name="backbone", trainable=False)
    >>> model = keras.Sequential([keras.Input((4,)), backbone, keras.layers.Dense(1)])
    >>> model.compile("adam", "mse")
    >>> unfreeze = kmt.callbacks.ProgressiveUnfreeze([1])
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=2,
    ...                     callbacks=[unfreeze], verbose=0)
    >>> history.history["unfrozen_blocks"]
    [0, 1]
    """

    def __init__(
        self,
        unfreeze_epochs,
        blocks="auto",
        learning_rate_multiplier: float = 1.0,
        train_batchnorm: bool = False,
    ):
        super().__init__()
        if not isinstance(unfreeze_epochs, (list, tuple)) or not unfreeze_epochs:
            raise ValueError(
                "Received an invalid value for `unfreeze_epochs`, expected a "
                "non-empty list of epoch indices. "
                f"Received: unfreeze_epochs={unfreeze_epochs!r}"
            )
        for epoch in unfreeze_epochs:
            check_number("unfreeze_epochs", epoch, low=0, integer=True)
        if list(unfreeze_epochs) != sorted(unfreeze_epochs):
            raise ValueError(
                "Received an invalid value for `unfreeze_epochs`, expected "
                "non-decreasing epochs (the top block first). "
                f"Received: unfreeze_epochs={unfreeze_epochs!r}"
            )
        if blocks != "auto":
            ok = isinstance(blocks, (list, tuple)) and all(
                isinstance(b, str)
                or (isinstance(b, (list, tuple)) and all(isinstance(n, str) for n in b))
                for b in blocks
            )
            if not ok:
                raise ValueError(
                    "Received an invalid value for `blocks`, expected 'auto' or a "
                    "list whose items are layer names or lists of layer names. "
                    f"Received: blocks={blocks!r}"
                )
            if len(blocks) != len(unfreeze_epochs):
                raise ValueError(
                    "Received an invalid value for `blocks`, expected one block "
                    f"per entry of `unfreeze_epochs` ({len(unfreeze_epochs)}). "
                    f"Received: blocks={blocks!r}"
                )
        if not isinstance(train_batchnorm, bool):
            raise ValueError(
                "Received an invalid value for `train_batchnorm`, expected a bool. "
                f"Received: train_batchnorm={train_batchnorm!r}"
            )
        self.unfreeze_epochs = list(unfreeze_epochs)
        self.blocks = blocks
        self.learning_rate_multiplier = check_number(
            "learning_rate_multiplier", learning_rate_multiplier, low=0, low_open=True
        )
        self.train_batchnorm = train_batchnorm
        self._block_layers = None
        self._prepared_for = None
        self._applied = 0

    # Resolution of the blocks -------------------------------------------------

    def _resolve_blocks(self):
        model = self.model
        if self.blocks == "auto":
            candidates = [
                layer
                for layer in _top_level_layers(model)
                if not layer.trainable and layer.weights and not _is_batchnorm(layer)
            ]
            candidates.reverse()
            if len(candidates) < len(self.unfreeze_epochs):
                raise ValueError(
                    f"ProgressiveUnfreeze has {len(self.unfreeze_epochs)} unfreeze "
                    f"epochs but the model has {len(candidates)} frozen layers with "
                    "weights to unfreeze: "
                    f"{[layer.name for layer in candidates]}. Freeze the backbone "
                    "first (e.g. with `kmt.attach(..., freeze=True)`), pass fewer "
                    "`unfreeze_epochs`, or name the `blocks`."
                )
            return [[layer] for layer in candidates[: len(self.unfreeze_epochs)]]
        by_name = {layer.name: layer for layer in sublayers(model)}
        resolved = []
        for block in self.blocks:
            names = [block] if isinstance(block, str) else list(block)
            missing = [name for name in names if name not in by_name]
            if missing:
                raise ValueError(
                    f"ProgressiveUnfreeze: no layer named {missing} in model "
                    f"{model.name!r}. Available layers: {sorted(by_name)}."
                )
            resolved.append([by_name[name] for name in names])
        return resolved

    def _set_block(self, block, trainable):
        for layer in block:
            layer.trainable = trainable
            if trainable and not self.train_batchnorm:
                for inner in [layer, *sublayers(layer)]:
                    if _is_batchnorm(inner):
                        inner.trainable = False

    def _block_variables(self):
        variables = []
        for block in self._block_layers:
            for layer in block:
                previous = layer.trainable
                self._set_block([layer], True)
                variables.extend(layer.trainable_variables)
                layer.trainable = previous
        return variables

    # Optimizer ------------------------------------------------------------------

    def _rebuild_optimizer(self):
        """A fresh optimizer over every variable that may become trainable.

        On JAX over the trainable variables only: its stateless update takes
        exactly the variables the optimizer was built with, so the optimizer
        is rebuilt at each unfreeze (slots of variables it had are kept).
        """
        model = self.model
        old = model.optimizer
        blocks = list({id(v): v for v in self._block_variables()}.values())
        # Read after `_block_variables`, which toggles the blocks' flags: every
        # variable trainable now or once its block unfreezes (LoRA factors
        # trainable from the start too), each once.
        variables = list(model.trainable_variables)
        if not _exact_optimizer():
            variables = list({id(v): v for v in variables + blocks}.values())
        with strategy_scope(model):
            new = old.__class__.from_config(old.get_config())
            new.build(variables)
        if old.built:
            previous = {(v.name, tuple(v.shape)): v for v in old.variables}
            for variable in new.variables:
                source = previous.get((variable.name, tuple(variable.shape)))
                if source is not None:
                    variable.assign(source)
        if self.learning_rate_multiplier != 1.0:
            self._scale_learning_rate(base_optimizer(new), blocks)
        model.optimizer = new

    def _scale_learning_rate(self, optimizer, variables):
        multiplier = self.learning_rate_multiplier
        # The optimizer's own key function maps replica components of a
        # distributed variable to the same key.
        keys = {optimizer._var_key(v) for v in variables}
        update_step = optimizer.update_step

        def scaled_update_step(gradient, variable, learning_rate):
            if optimizer._var_key(variable) in keys:
                learning_rate = learning_rate * multiplier
            return update_step(gradient, variable, learning_rate)

        optimizer.update_step = scaled_update_step

    # Callback hooks -------------------------------------------------------------

    def _prepare(self):
        require_compiled(self.model, "ProgressiveUnfreeze")
        self._block_layers = self._resolve_blocks()
        for block in self._block_layers:
            self._set_block(block, False)
        self._rebuild_optimizer()
        self._prepared_for = self.model
        self._applied = 0

    def set_model(self, model):
        super().set_model(model)
        # Preparing here, before any `on_train_begin`, lets BackupAndRestore
        # load its state into the rebuilt optimizer whatever the callback order.
        self._prepared_for = None
        if getattr(model, "optimizer", None) is not None and model.built:
            self._prepare()

    def on_train_begin(self, logs=None):
        if self._prepared_for is not self.model:
            self._prepare()
        self._applied = 0
        retrace(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        target = sum(1 for start in self.unfreeze_epochs if start <= epoch)
        if target == self._applied:
            return
        for index, block in enumerate(self._block_layers):
            self._set_block(block, index < target)
        self._applied = target
        if _exact_optimizer():
            self._rebuild_optimizer()
        retrace(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["unfrozen_blocks"] = self._applied


def _exact_optimizer():
    """True where the optimizer must hold exactly the trainable variables."""
    return keras.backend.backend() == "jax"
