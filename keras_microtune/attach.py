"""attach(): plug MicroTune adapters and a new head into an existing model."""

import math

import keras

from keras_microtune.adapters import apply_placement, resolve_placement
from keras_microtune.layers import EmbeddingStage, FeatureStage, MicroTune, OutputStage
from keras_microtune.optimize.graph import copy_weights, is_graph_model
from keras_microtune.training import PrefixCacheModel

# Layers that make up a classifier head when they close a model.
HEAD_TYPES = (
    keras.layers.Dense,
    keras.layers.Dropout,
    keras.layers.Softmax,
    keras.layers.Activation,
    keras.layers.Flatten,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    EmbeddingStage,
    OutputStage,
)
# Layers whose output ends a feature block: the candidates for "auto".
BLOCK_END_TYPES = (
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Add,
    keras.layers.Concatenate,
    FeatureStage,
    keras.Model,
)
AUTO_ADAPTERS = 2
AUTO_MAX_WIDTH = 256
AUTO_FALLBACK_RANK = 8
DEFAULT_GROUPS = 4
# The default placement: LoRA of this rank on every kernel, every bias trains.
DEFAULT_LORA_RANK = 2
NAMED_LORA_RANK = 4


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "attach() expects a keras.Model (Sequential or Functional). "
            f"Received: model of type {type(model).__name__}"
        )
    if not is_graph_model(model):
        raise TypeError(
            "attach() supports Sequential and Functional models (including a "
            "backbone model used as a layer inside a Functional model). "
            f"Received a subclassed model {type(model).__name__!r}: wrap its layers "
            "in a Functional model, or call the subclassed model on a "
            "keras.Input inside a Functional model and attach to that."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            "attach() needs a built model with known inputs. Build it first, e.g. "
            "by giving the Sequential model a keras.Input as its first layer."
        )


def _as_functional(model):
    """A Functional copy of `model` with its own layers and weights."""
    clone = keras.models.clone_model(model)
    for source, target in zip(model.layers, clone.layers):
        copy_weights(source, target)
    if isinstance(clone, keras.Sequential):
        inputs = keras.Input(
            batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype, name="input"
        )
        x = inputs
        for layer in clone.layers:
            x = layer(x)
        clone = keras.Model(inputs, x, name=model.name)
    return clone


def _head_layers(model):
    """The trailing chain of head-type layers of a single-output model."""
    if len(model.outputs) != 1:
        return []
    head = []
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    while len(layers) > 1 and isinstance(layers[-1], HEAD_TYPES):
        # `_keras_history` names the layer that produced a symbolic tensor.
        producer = layers[-1].input._keras_history[0]
        if producer is not layers[-2]:
            break
        head.append(layers.pop())
    return head[::-1]


def _width(tensor):
    return tensor.shape[-1]


def _auto_points(body):
    candidates = [
        layer
        for layer in body
        if isinstance(layer, BLOCK_END_TYPES)
        and not isinstance(layer.output, (list, tuple))
        and len(layer.output.shape) >= 2
        and layer.output.shape[-1] is not None
        and layer.output.shape[-1] <= AUTO_MAX_WIDTH
    ]
    return [layer.name for layer in candidates[-AUTO_ADAPTERS:]]


def _resolve_adapters(adapters, model, head):
    body = [
        layer
        for layer in model.layers
        if layer not in head and not isinstance(layer, keras.layers.InputLayer)
    ]
    if adapters is None:
        return [], {}
    if adapters == "auto":
        names = _auto_points(body)
        if names:
            return names, {}
        # No narrow block end: one low-rank adapter on the features.
        return [body[-1].name], {body[-1].name: AUTO_FALLBACK_RANK}
    if isinstance(adapters, str):
        adapters = [adapters]
    names = list(adapters)
    available = [layer.name for layer in body]
    for name in names:
        if name not in available:
            raise ValueError(
                f"Received an invalid adapter layer name {name!r}: no such layer "
                f"before the head. Available layers: {available}. Pass "
                "adapters='auto', None, or a list of these names."
            )
    return names, {}


def attach(
    model,
    num_classes=None,
    adapters="default",
    groups=None,
    rank=None,
    freeze=True,
    head=None,
    lora=None,
    lora_rank=None,
    train_bias=False,
    train_norm=False,
    budget=None,
    data=None,
):
    """Plug adapters and a task head into a trained model.

    Returns a new Functional model; `model` itself is not modified. The
    backbone is copied with its weights and frozen (BatchNorm then runs in
    inference mode), adapters are placed, and the head is replaced when
    `num_classes` or `head` is given. Every adapter starts as the identity,
    so the attached model computes the same features as `model` until it is
    trained.

    Default placement (`adapters="default"` and none of `groups`, `rank`,
    `lora`, `train_bias`, `train_norm`, `budget` given, `freeze=True`): a Keras
    LoRA update of rank `lora_rank` (2 unless given) on every Dense/Conv
    kernel of the backbone (`lora="all"`), every bias (Dense/Conv biases and
    BatchNorm/LayerNorm offsets, `train_bias=True`), and the head: a thin
    update spread over all layers, which did best across the transfer suite
    (`benchmarks/transfer.py`, BENCHMARKS.md table 2): concentrating the same
    parameters in the last layers lost 5-20 points on the cross-domain tasks,
    where the early layers must adapt. LoRA merges into the kernels at export,
    so the deployed model is the backbone's size. Because the first layer
    trains, `fit` has no frozen prefix to cache; place adapters late (e.g.
    `lora=["block3"], train_norm=["block3"]`) for the cached, faster form.
    A backbone without such kernels (e.g. a nested backbone model) gets
    `adapters="auto"` instead. With `budget` and `data`, a contribution
    analysis on the data chooses instead (see `budget`).

    `MicroTune` placement with `adapters="auto"` (also implied by giving
    `groups` or `rank` alone): after the last two top-level
    layers before the head that end a feature block (ReLU/Activation, Add,
    Concatenate, FeatureStage, or a nested backbone model) and are at most
    256 channels wide; `groups` is reduced to `gcd(groups, width)` there. When
    no such layer exists, one adapter of rank 8 goes on the features.

    Head detection: a trailing chain of Dense, Dropout, Softmax, Activation,
    Flatten, global pooling, EmbeddingStage and OutputStage layers is the old
    head. With `num_classes`, it is replaced by
    `EmbeddingStage("avg")` (or `EmbeddingStage(None)` on vector features)
    and `OutputStage(num_classes)`. Without `num_classes` or `head`, the old
    head is kept and stays trainable.

    Args:
        model: keras.Model. A built Sequential or Functional model.
        num_classes: int or None. Classes of the new task. Defaults to `None`.
        adapters: "default", "auto", None, a layer name, or a list of layer
            names: where `MicroTune` adapters go. "default": the default
            placement above (LoRA, no MicroTune), or `"auto"` when `groups`
            or `rank` is given, or nothing when `lora`, `train_bias` or
            `train_norm` is. None: no MicroTune (head only unless other
            arguments add something). Defaults to `"default"`.
        groups: int or None. `MicroTune` groups; None means 4. Defaults to
            `None`.
        rank: int or None. `MicroTune` rank. Defaults to `None`.
        freeze: bool. Freeze the backbone. Defaults to `True`.
        head: keras.layers.Layer or None. A custom head applied to the
            features instead of the default one. Defaults to `None`.
        lora: None, "auto", a layer name, a list of names, or a dict
            `{name: rank}`. Inner adapters: Keras LoRA
            (`layer.enable_lora`) on these layers' Dense/Conv kernels, a
            zero-initialised low-rank update of the frozen kernel that
            `kmt.optimize.merge_adapters` folds back into it (+0 bytes
            deployed). A stage name means all its kernels (FeatureStage:
            the stem and 1x1 convolutions; depthwise ones have no LoRA),
            `"stage/sublayer"` one of them (e.g. `"block3/block0_pw"`).
            `"all"`: every layer with such kernels; `"auto"`: the last two
            layers before the head that have them. Defaults to `None`.
        lora_rank: int or None. Rank for `lora` names given without one,
            and for the default placement. None: 2 in the default
            placement, 4 otherwise. Defaults to `None`.
        train_bias: bool, a name or a list of names. Train the biases of
            these layers (True: every backbone layer): Dense/Conv biases and
            BatchNorm/LayerNorm offsets (`beta`, the bias BatchNorm folds
            into). Defaults to `False`.
        train_norm: bool, a name or a list of names. Train the
            BatchNorm/LayerNorm scale and offset (`gamma`, `beta`) of these
            layers. BatchNorm stays in inference mode: its moving statistics
            stay frozen and batch statistics are never used. Defaults to
            `False`.
        budget: int, float or None. With `data`, choose what trains by a
            contribution analysis instead of `adapters`: an int is a count of
            trainable parameters (the head included), a float in (0, 1] a
            fraction of the parameters full fine-tuning would train (every
            weight but BatchNorm's moving statistics). Candidates are a LoRA
            update (Keras' `enable_lora`, ranks 1-32) of each frozen
            Conv/Dense kernel, each depthwise kernel, bias and norm affine
            pair; each is scored by the first-order loss decrease it allows
            per parameter (top-r singular values of dL/dW for LoRA, squared
            gradient norm otherwise) with the new head fitted on frozen
            features (see `data`), then chosen greedily within the budget.
            The choice is in `kmt.placement_report(model)` and logged
            (`keras_microtune` logger, INFO). Defaults to `None`.
        data: tuple `(x, y)` or None. A few labelled batches of the new task
            (at most 512 samples are used: a fixed random subset of larger
            data, not its first samples). With a new head (`num_classes`
            or `head`), the head is first fitted on the backbone's frozen
            features of `data` and keeps those weights (linear probing then
            fine-tuning, LP-FT), so `fit` starts from a head that fits the
            task (BENCHMARKS.md, table 2's `data` rows). The loss is
            inferred from `y` (integer classes: sparse categorical
            cross-entropy; otherwise mean squared error). With `budget`,
            `data` also scores the placement. Defaults to `None`.

    Only the chosen LoRA factors, biases and norm parameters of the backbone
    train (`model.trainable_weights` lists exactly them, the adapters and
    the head); the placement is applied by
    `keras_microtune.adapters.apply_placement`.

    Saving and resuming: the returned model's config records these choices,
    so `keras.saving.load_model` trains the same variables. Keras alone saves
    LoRA merged into the kernel and reloads both factors as zero; the model
    also saves the factors and frozen kernels and puts them back after
    `load_weights` (`BackupAndRestore`, `ModelCheckpoint`) and before `fit`,
    so a resumed fit continues as the uninterrupted one (see
    `PrefixCacheModel`).

    Returns:
        A new Functional keras.Model, a `PrefixCacheModel`: its `fit`
        computes a long frozen prefix once for array inputs
        (`model.cache_prefix = False` turns that off).

    Example:

    >>> import keras
    >>> import keras_microtune as kmt
    >>> backbone = keras.Sequential([
    ...     keras.Input((16, 3)),
    ...     kmt.layers.FeatureStage([8, 16]),
    ...     kmt.layers.EmbeddingStage(),
    ...     kmt.layers.OutputStage(5),
    ... ])
    >>> model = kmt.attach(backbone, num_classes=3)
    >>> model.output_shape
    (None, 3)
    """
    _check_model(model)
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(
            "Received an invalid value for `num_classes`, expected None or a "
            f"positive integer. Received: num_classes={num_classes!r}"
        )
    if head is not None and not callable(head):
        raise TypeError(
            "Received an invalid value for `head`, expected None or a Keras layer. "
            f"Received: head of type {type(head).__name__}"
        )
    if budget is not None and data is None:
        raise ValueError(
            "`budget` needs `data`: placement under a budget scores the "
            "candidates on `data=(x, y)`. Pass data=(x, y), a few labelled "
            "batches of the new task, or leave budget=None for the default "
            f"placement. Received: budget={budget!r}, data=None"
        )
    if data is not None and budget is None and num_classes is None and head is None:
        raise ValueError(
            "`data` without `budget` fits the new head on the frozen features, "
            "but this call keeps the model's own head. Pass num_classes (or "
            "head) for a new head, budget=... to choose the placement from "
            "the data, or leave data=None. Received: num_classes=None, "
            "head=None, budget=None"
        )
    if budget is not None:
        if not freeze:
            raise ValueError(
                "`budget` chooses what trains in a frozen backbone; it cannot be "
                "combined with freeze=False. Received: freeze=False"
            )
        given = {
            name: value
            for name, value, default in (
                ("adapters", adapters, "default"),
                ("groups", groups, None),
                ("rank", rank, None),
                ("lora", lora, None),
                ("train_bias", train_bias, False),
                ("train_norm", train_norm, False),
            )
            if value is not default and value is not None
        }
        if given:
            raise ValueError(
                "`budget` chooses the adapters, biases and norms itself; leave "
                f"{', '.join(f'`{n}`' for n in given)} at the default. Received: "
                + ", ".join(f"{n}={v!r}" for n, v in given.items())
            )
    default_placement = (
        adapters == "default"
        and freeze
        and budget is None
        and groups is None
        and rank is None
        and lora is None
        and train_bias is False
        and train_norm is False
    )
    if adapters == "default":
        # MicroTune's arguments alone ask for MicroTune, as before.
        adapters = "auto" if groups is not None or rank is not None else None
    groups = DEFAULT_GROUPS if groups is None else groups
    # Validate the adapter arguments once, before any copying.
    MicroTune(groups=groups, rank=rank)
    replace_head = num_classes is not None or head is not None
    if replace_head and len(model.outputs) != 1:
        raise ValueError(
            "attach() can only replace the head of a single-output model. "
            f"Received a model with {len(model.outputs)} outputs; pass "
            "num_classes=None and head=None to add adapters only."
        )

    base = _as_functional(model)
    old_head = _head_layers(base)
    body_names = [
        x.name
        for x in base.layers
        if x not in old_head and not isinstance(x, keras.layers.InputLayer)
    ]
    if lora_rank is None:
        lora_rank = DEFAULT_LORA_RANK if default_placement else NAMED_LORA_RANK
    if default_placement:
        placement = resolve_placement(
            base, body_names, lora="all", lora_rank=lora_rank, train_bias=True
        )
        if not placement["lora"]:  # e.g. a nested backbone model
            adapters, placement = "auto", {"lora": {}, "bias": [], "norm": []}
    else:
        placement = resolve_placement(
            base,
            body_names,
            lora=lora,
            lora_rank=lora_rank,
            train_bias=train_bias,
            train_norm=train_norm,
        )
    names, ranks = _resolve_adapters(adapters, base, old_head)
    auto = adapters == "auto"
    outputs_by_name = {}

    def call_function(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if layer.name in names:
            width = _width(out)
            layer_groups = math.gcd(groups, width) if auto else groups
            out = MicroTune(
                groups=layer_groups,
                rank=ranks.get(layer.name, rank),
                name=f"{layer.name}_microtune",
            )(out)
        outputs_by_name[layer.name] = out
        return out

    adapted = keras.models.clone_model(
        base, clone_function=lambda layer: layer, call_function=call_function
    )
    head_names = {layer.name for layer in old_head}
    for layer in adapted.layers:
        if layer.name in head_names:
            layer.trainable = not replace_head
        elif not isinstance(layer, MicroTune):
            layer.trainable = not freeze
    apply_placement(adapted, placement)

    # A single input or output stays a single tensor, so calling the model on
    # an array matches its structure.
    inputs = adapted.inputs[0] if len(adapted.inputs) == 1 else adapted.inputs
    if not replace_head:
        outputs = adapted.outputs[0] if len(adapted.outputs) == 1 else adapted.outputs
        result = PrefixCacheModel(inputs, outputs, name=f"{model.name}_microtune")
        if budget is not None:
            head_layers = [layer for layer in adapted.layers if layer.trainable]
            _use_data(result, None, head_layers, data, budget)
        return result

    features = adapted.outputs[0]
    if old_head:
        body = [layer for layer in base.layers if layer not in old_head]
        features = outputs_by_name[body[-1].name]
    if head is None:
        pooling = None if len(features.shape) == 2 else "avg"
        x = EmbeddingStage(pooling=pooling, name="embedding")(features)
        outputs = OutputStage(num_classes, name="classifier")(x)
    else:
        outputs = head(features)
    result = PrefixCacheModel(inputs, outputs, name=f"{model.name}_microtune")
    if data is not None:
        head_layers = [x for x in result.layers if x not in adapted.layers]
        _use_data(result, features, head_layers, data, budget)
    return result


def _use_data(model, features, head_layers, data, budget):
    """Fit the new head on `data` (if any), then place within `budget`."""
    from keras_microtune import placement

    header, x, y, loss = placement.prepare(model, data, budget)  # errors first
    fitted = None
    if features is not None:
        fitted = placement.fit_head(model, features, x, y, loss)
    if budget is not None:
        plan = placement.plan_placement(model, head_layers, header, x, y, loss)
        if fitted is not None:
            plan["head_fit"] = fitted
        placement.apply_plan(model, plan)
