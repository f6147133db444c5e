"""Inner adapters and bias/norm training: a placement plan, and applying it.

A plan says which kernels get a Keras LoRA update of which rank and which
biases and norm affine parameters train:

    {"lora": {"block3": 4, "block2/block1_pw": 2}, "bias": ["block3"],
     "norm": ["block2", "bn_1"]}

Names are top-level layer names, or `"stage/sublayer"` for a layer inside a
stage (FeatureStage's `stem_conv`, `block{i}_pw`, `block{i}_dw_bn`...,
EmbeddingStage's `projection`, OutputStage's `dense`). A stage name stands
for all its matching sublayers. `resolve_placement` turns `attach()`'s
arguments into a plan; `apply_placement` applies any plan (e.g. one chosen
by a contribution analysis).

How it trains: the layers keep their layer-level `trainable=False` (so
BatchNormalization keeps running in inference mode: moving statistics
frozen, batch statistics never used) and only the chosen variables are
flagged trainable, which is what `model.trainable_weights` and `fit` use.
Per-variable flags are not part of a layer's config; `PrefixCacheModel`
(what `attach()` returns) keeps them in its own config, so a model reloaded
from `.keras` trains the same variables.

Keras saves a LoRA kernel with `A @ B` merged into it and loads it back with
both factors zero, where their gradients are zero too (see `restart_lora`,
which `PrefixCacheModel` calls after `load_weights` and before `fit`).
"""

import keras

from keras_microtune._api import sublayers
from keras_microtune.layers import EmbeddingStage, FeatureStage, OutputStage

LORA_TYPES = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
NORM_TYPES = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
STAGE_TYPES = (FeatureStage, EmbeddingStage, OutputStage)
AUTO_LORA_LAYERS = 2


def _is_lora_capable(layer):
    return isinstance(layer, LORA_TYPES) and not isinstance(
        layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)
    )


def _leaves(top):
    """(name suffix, layer) pairs of `top` and the layers nested in it."""
    if isinstance(top, keras.Model):
        return []  # Nested backbones: attach to their layers is not supported.
    inner = sublayers(top)
    if not inner:
        return [("", top)]
    return [(f"/{layer.name}", layer) for layer in inner]


def _find(model, name, body):
    top_name, _, sub = name.partition("/")
    if top_name not in body:
        raise ValueError(
            f"Received an invalid layer name {name!r}: no such layer before the "
            f"head. Available layers: {sorted(body)}. Use a layer name, or "
            "'stage/sublayer' for a layer inside a stage."
        )
    top = model.get_layer(top_name)
    leaves = _leaves(top)
    if sub:
        leaves = [(s, layer) for s, layer in leaves if s == f"/{sub}"]
        if not leaves:
            available = [layer.name for _, layer in _leaves(top)]
            raise ValueError(
                f"Received an invalid layer name {name!r}: layer {top_name!r} has "
                f"no sublayer {sub!r}. Its sublayers: {available}"
            )
    return [(top_name + s, layer) for s, layer in leaves]


def _names(argument, value, body):
    if value is True:
        return list(body)
    if value is False or value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"Received an invalid value for `{argument}`, expected a bool, a layer "
        f"name or a list of layer names. Received: {argument}={value!r}"
    )


def _rank(value, argument="lora_rank"):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected a positive "
            f"integer. Received: {argument}={value!r}"
        )
    return value


def resolve_placement(
    model, body, lora=None, lora_rank=4, train_bias=False, train_norm=False
):
    """Turn `attach()`'s placement arguments into a plan (see module docs).

    Args:
        model: keras.Model. The (copied) backbone.
        body: list of str. Names of the top-level layers placement may use.
        lora: None, "all", "auto", a name, a list of names or a dict
            {name: rank}. "all": every LoRA-capable kernel before the head;
            "auto": those in the last two layers before the head that have
            one. Defaults to `None`.
        lora_rank: int. Rank for names given without one. Defaults to `4`.
        train_bias: bool, a name or a list of names. Defaults to `False`.
        train_norm: bool, a name or a list of names. Defaults to `False`.

    Returns:
        dict with keys "lora" ({leaf name: rank}), "bias" and "norm" (lists
        of leaf names).
    """
    lora_rank = _rank(lora_rank)
    if lora in ("all", "auto"):
        capable = [
            name
            for name in body
            if any(_is_lora_capable(x) for _, x in _leaves(model.get_layer(name)))
        ]
        lora = capable if lora == "all" else capable[-AUTO_LORA_LAYERS:]
    if isinstance(lora, dict):
        ranks = {_names("lora", k, body)[0]: _rank(v, "lora") for k, v in lora.items()}
    else:
        ranks = {name: lora_rank for name in _names("lora", lora, body)}
    plan = {"lora": {}, "bias": [], "norm": []}
    for name, rank in ranks.items():
        leaves = [(n, x) for n, x in _find(model, name, body) if _is_lora_capable(x)]
        if not leaves:
            raise ValueError(
                f"Received an invalid value for `lora`: layer {name!r} has no "
                "Dense or Conv kernel Keras can add LoRA to (DepthwiseConv and "
                "SeparableConv have none); train its biases or norms with "
                "train_bias/train_norm instead."
            )
        plan["lora"].update({n: rank for n, _ in leaves})
    for key, value in (("bias", train_bias), ("norm", train_norm)):
        names = _names(f"train_{key}", value, body)
        leaves = [n for name in names for n, x in _find(model, name, body)]
        plan[key] = list(dict.fromkeys(leaves))
    return plan


def _variables(layer, key):
    if key == "lora":
        return [layer.lora_kernel_a, layer.lora_kernel_b]
    if isinstance(layer, NORM_TYPES):
        names = ("beta",) if key == "bias" else ("gamma", "beta")
        return [v for v in layer.weights if v.name in names]
    if key == "bias" and getattr(layer, "bias", None) is not None:
        return [layer.bias]
    return []


def _enable_lora(top, leaf, rank):
    if getattr(leaf, "lora_enabled", False):
        raise ValueError(
            f"Layer {leaf.name!r} already has LoRA (rank {leaf.lora_rank}). "
            "Place LoRA once per kernel; merge it first with "
            "kmt.optimize.merge_adapters(model) to add another."
        )
    leaf.enable_lora(rank)  # Freezes the kernel; apply_placement flags A, B.
    if isinstance(top, FeatureStage):
        ranks = {
            name: top.lora_rank_of(name)
            for name in ["stem_conv"]
            + [f"block{i}_pw" for i in range(len(top.filters))]
            if top.lora_rank_of(name)
        }
        top.lora_rank = {**ranks, leaf.name: rank}
    elif isinstance(top, (EmbeddingStage, OutputStage)):
        top.lora_rank = rank


def apply_placement(model, plan):
    """Apply a placement plan to `model`'s layers, in place.

    Enables Keras LoRA (zero-initialised, so outputs are unchanged) on the
    planned kernels, recording it in the stage's `lora_rank` so `.keras`
    saving and `get_config` see it, and flags exactly the planned LoRA,
    bias and norm variables trainable. Call it on a copy (as `attach()`
    does): the layers of `model` are changed.

    Args:
        model: keras.Model. A Functional model.
        plan: dict. {"lora": {name: rank}, "bias": [names], "norm": [names]}
            (missing keys mean none), with names as in the module docs.

    Returns:
        list of the variables made trainable.
    """
    unknown = set(plan) - {"lora", "bias", "norm"}
    if unknown:
        raise ValueError(
            "Received an invalid placement plan: unknown keys "
            f"{sorted(unknown)}; expected 'lora', 'bias' and 'norm'."
        )
    body = [layer.name for layer in model.layers]
    chosen = []
    for name, rank in plan.get("lora", {}).items():
        leaves = [x for _, x in _find(model, name, body) if _is_lora_capable(x)]
        if not leaves:
            raise ValueError(
                f"Received an invalid placement plan: {name!r} has no Dense or "
                "Conv kernel Keras can add LoRA to."
            )
        for leaf in leaves:
            _enable_lora(model.get_layer(name.partition("/")[0]), leaf, _rank(rank))
            chosen += _variables(leaf, "lora")
    for key in ("bias", "norm"):
        for name in plan.get(key, []):
            chosen += [
                v for _, x in _find(model, name, body) for v in _variables(x, key)
            ]
    for variable in chosen:
        variable.trainable = True
    return list({id(v): v for v in chosen}.values())


def restart_lora(model):
    """Re-draw the A factor of LoRA updates a load left with both factors zero.

    Keras' Dense/Conv `save_own_variables` stores the kernel with `A @ B`
    merged into it and `load_own_variables` assigns zeros to both factors;
    with both zero their gradients are zero, so the update would never train
    again. This draws A again as `enable_lora` does (He uniform, seeded by
    `keras.utils.set_random_seed`) and keeps B zero, so outputs are unchanged
    and training continues from the loaded (merged) kernel with a fresh
    update. A layer with any non-zero factor is left as it is.

    Args:
        model: keras.Layer. The model (or layer) whose LoRA layers to check.

    Returns:
        list of the layers whose A factor was re-drawn.
    """
    restarted = []
    for layer in sublayers(model, include_self=True):
        if not getattr(layer, "lora_enabled", False):
            continue
        a, b = layer.lora_kernel_a, layer.lora_kernel_b
        if any(bool(keras.ops.any(keras.ops.not_equal(v, 0))) for v in (a, b)):
            continue
        a.assign(keras.initializers.HeUniform()(a.shape, dtype=a.dtype))
        restarted.append(layer)
    return restarted
