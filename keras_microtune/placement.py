"""Placement under a budget: where adapters go, chosen from the user's data.

`attach(model, ..., budget=..., data=(x, y))` first fits the new head on the
frozen features (`fit_head`), then calls `plan_placement`: every
frozen layer of the backbone offers candidates (a LoRA update of a Conv/Dense
kernel at a few ranks, a depthwise kernel, a bias, a norm's affine
parameters), each scored by the first-order loss decrease it can buy per
trainable parameter on one pass over (a sample of) the data, then a greedy
knapsack fills the budget left after the head.
"""

import json
import logging

import keras
import numpy as np

from keras_microtune.callbacks._base import sublayers

logger = logging.getLogger(__name__)

LORA_RANKS = (1, 2, 4, 8, 16, 32)
MAX_SAMPLES = 512
PROBE_EPOCHS = 60
NORM_TYPES = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
LORA_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
DEPTHWISE_TYPES = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_MOVING = ("moving_mean", "moving_variance")


def _size(variable):
    return int(np.prod(variable.shape))


def full_parameter_count(model):
    """Parameters full fine-tuning trains: every weight but BN moving stats."""
    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            if not (
                isinstance(layer, keras.layers.BatchNormalization)
                and variable.name in _MOVING
            ):
                total += _size(variable)
    return total


def resolve_budget(budget, full_count, head_count):
    """The budget as a parameter count; Keras-style errors for bad values."""
    numeric = isinstance(budget, (int, float)) and not isinstance(budget, bool)
    if not numeric or not np.isfinite(budget) or budget <= 0:
        raise ValueError(
            "Received an invalid value for `budget`, expected a positive int (a "
            "count of trainable parameters) or a float in (0, 1] (a fraction of "
            f"the {full_count:,} parameters full fine-tuning would train). "
            f"Received: budget={budget!r}"
        )
    if isinstance(budget, float):
        if budget > 1:
            raise ValueError(
                "Received an invalid value for `budget`: a float is a fraction of "
                f"the model's {full_count:,} parameters and must be in (0, 1]; "
                "pass an int for a parameter count. "
                f"Received: budget={budget!r}"
            )
        count = int(budget * full_count)
    else:
        count = budget
    if count < head_count:
        raise ValueError(
            f"Received a `budget` of {count:,} trainable parameters, smaller than "
            f"the head alone, which trains {head_count:,}. Pass budget >= "
            f"{head_count} (or a fraction >= {head_count / full_count:.4f}). "
            f"Received: budget={budget!r}"
        )
    return count


def _walk(model, skip):
    """(key, layer) for every frozen layer with weights, nested ones included."""
    for top in model.layers:
        if top in skip or top.trainable:
            continue
        yield top.name, top
        if isinstance(top, keras.Model):
            continue  # adapters.apply_placement does not reach into them
        for sub in sublayers(top):
            yield f"{top.name}/{sub.name}", sub


def find_layer(model, key):
    """The layer a placement key names (`"block2/block0_pw"` or `"conv1"`)."""
    top, _, rest = key.partition("/")
    layer = model.get_layer(top)
    if not rest:
        return layer
    for sub in sublayers(layer):
        if sub.name == rest:
            return sub
    raise ValueError(f"No layer {rest!r} inside {top!r} (placement key {key!r}).")


def _lora_shape(layer):
    shape = tuple(layer.kernel.shape)
    return int(np.prod(shape[:-1])), int(shape[-1])


def candidates(model, head_layers):
    """Candidate items: dicts with key, kind, variables (what is scored)."""
    found = []
    for key, layer in _walk(model, set(head_layers)):
        if getattr(layer, "lora_enabled", False):
            continue
        if isinstance(layer, LORA_TYPES):
            found.append({"key": key, "kind": "lora", "vars": [layer.kernel]})
        elif isinstance(layer, DEPTHWISE_TYPES):
            found.append({"key": key, "kind": "kernel", "vars": [layer.kernel]})
        if getattr(layer, "bias", None) is not None and not isinstance(
            layer, NORM_TYPES
        ):
            found.append({"key": key, "kind": "bias", "vars": [layer.bias]})
        if isinstance(layer, NORM_TYPES):
            affine = [v for v in (layer.gamma, layer.beta) if v is not None]
            if affine:
                found.append({"key": key, "kind": "norm", "vars": affine})
    return found


def _loss_fn(model, x, y):
    probe = np.asarray(model(x[:8], training=False))
    y = np.asarray(y)
    out_shape = tuple(model.outputs[0].shape[1:])
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 and len(out_shape) == 1:
        if y.min() < 0 or y.max() >= out_shape[0]:
            raise ValueError(
                f"Received labels in [{y.min()}, {y.max()}] in `data`, expected "
                f"integer classes in [0, {out_shape[0] - 1}] for a model with "
                f"{out_shape[0]} outputs."
            )
        probs = probe.min() >= 0 and np.allclose(probe.sum(-1), 1, atol=1e-3)
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not probs)
    if tuple(y.shape[1:]) == out_shape:
        return keras.losses.MeanSquaredError()
    raise ValueError(
        "Received `data` labels of shape "
        f"{y.shape}, expected integer class labels of shape ({len(y)},) or "
        f"targets of shape ({len(y)}, {', '.join(map(str, out_shape))}) matching "
        "the model's output."
    )


def check_data(model, data):
    """Validate `data=(x, y)` against the model; return numpy arrays."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(
            "Received an invalid value for `data`, expected a tuple `(x, y)` of "
            "arrays (a few labelled batches of the new task). "
            f"Received: data of type {type(data).__name__}"
        )
    x, y = (np.asarray(a) for a in data)
    expected = tuple(model.inputs[0].shape[1:])
    ok = x.ndim == len(expected) + 1 and all(
        e is None or e == s for e, s in zip(expected, x.shape[1:])
    )
    if not ok or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            "Received `data` of the wrong shape, expected x of shape "
            f"(n, {', '.join(str(e) for e in expected)}) and y with the same n > 0. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    return x.astype(model.inputs[0].dtype), y


def _sample(model, data):
    """`data` as arrays; above `MAX_SAMPLES`, a fixed random subset of them.

    Not the first ones: data sorted by class would give a head fitted, and
    a placement scored, on the first classes only.
    """
    x, y = check_data(model, data)
    if len(x) <= MAX_SAMPLES:
        return x, y
    keep = np.sort(np.random.default_rng(0).choice(len(x), MAX_SAMPLES, False))
    return x[keep], y[keep]


def prepare(model, data, budget=None):
    """Check `budget` and `data` against `model` before anything trains.

    Returns:
        tuple `(budget, x, y, loss)`: the budget's header (`budget`,
        `full_params`, `head_params`; None without a budget), `data` as
        arrays (see `_sample`) and the loss inferred from `y`. Budget errors
        come first, then data errors.
    """
    header = None
    if budget is not None:
        head = sum(_size(v) for v in model.trainable_weights)
        full = full_parameter_count(model)
        header = {
            "budget": resolve_budget(budget, full, head),
            "full_params": full,
            "head_params": head,
        }
    x, y = _sample(model, data)
    return header, x, y, _loss_fn(model, x, y)


def fit_head(model, features, x, y, loss):
    """Fit the new head on the frozen features of `x` (a linear probe).

    The head's weights stay fitted, so fine-tuning starts from a head that
    already fits the task (linear probing then fine-tuning, LP-FT): its first
    gradients into the adapters carry the task, not a random head's noise.
    Full-batch Adam at 1e-2 for `PROBE_EPOCHS` epochs; the features are
    computed once.

    Args:
        model: the attached Functional model; its backbone is frozen.
        features: the symbolic tensor the head reads.
        x, y, loss: from `prepare`.

    Returns:
        dict: `samples`, `epochs`, and the head's loss on them `before` and
        `after` the fit.
    """
    import tensorflow as tf

    extractor = keras.Model(model.inputs, features)
    feats = extractor.predict(x, verbose=0, batch_size=256)
    head = keras.Model(features, model.outputs[0])
    head.compile(keras.optimizers.Adam(1e-2), loss)
    before = float(loss(y, head(feats)))
    # One epoch of PROBE_EPOCHS full-batch steps: one trace, one iterator.
    steps = tf.data.Dataset.from_tensors((feats, y)).repeat(PROBE_EPOCHS)
    head.fit(steps, epochs=1, verbose=0)
    after = float(loss(y, head(feats)))
    logger.info(
        "head fitted on frozen features of %d samples: loss %.4f -> %.4f",
        len(y),
        before,
        after,
    )
    return {
        "samples": int(len(y)),
        "epochs": PROBE_EPOCHS,
        "before": before,
        "after": after,
    }


def _gradients(model, variables, x, y, loss, batch_size=128):
    import tensorflow as tf

    totals = [np.zeros(v.shape, "float64") for v in variables]
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with tf.GradientTape() as tape:
            for v in variables:
                tape.watch(v.value)
            value = loss(yb, model(xb, training=False)) * len(xb) / len(x)
        grads = tape.gradient(value, [v.value for v in variables])
        for total, g in zip(totals, grads):
            if g is not None:
                total += np.asarray(g, "float64")
    return totals


def score(model, items, x, y, loss):
    """Add to each item its options: (rank or None, params, gain), cumulative."""
    variables = [v for item in items for v in item["vars"]]
    grads = iter(_gradients(model, variables, x, y, loss))
    for item in items:
        g = [next(grads) for _ in item["vars"]]
        if item["kind"] == "lora":
            m, n = g[0].reshape(-1, g[0].shape[-1]).shape
            sigma2 = np.linalg.svd(g[0].reshape(m, n), compute_uv=False) ** 2
            item["options"] = [
                (r, r * (m + n), float(sigma2[:r].sum()))
                for r in LORA_RANKS
                if r <= min(m, n) and r * (m + n) < m * n
            ]
        else:
            size = sum(a.size for a in g)
            item["options"] = [(None, size, float(sum((a**2).sum() for a in g)))]
    return items


def choose(items, budget_left):
    """Greedy knapsack over option increments ranked by gain per parameter."""
    steps = []
    for index, item in enumerate(items):
        prev_params, prev_gain = 0, 0.0
        for level, (_, params, gain) in enumerate(item["options"]):
            d_params, d_gain = params - prev_params, gain - prev_gain
            steps.append((d_gain / d_params, index, level, d_params))
            prev_params, prev_gain = params, gain
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    level_of, left = {}, budget_left
    for _, index, level, d_params in steps:
        if level_of.get(index, -1) != level - 1 or d_params > left:
            continue
        level_of[index] = level
        left -= d_params
    chosen = []
    for index, level in sorted(level_of.items()):
        item = items[index]
        rank, params, gain = item["options"][level]
        chosen.append(
            {
                "layer": item["key"],
                "kind": item["kind"],
                "rank": rank,
                "params": params,
                "gain": gain,
            }
        )
    return chosen


def plan_placement(model, head_layers, header, x, y, loss):
    """Score the candidates of an attached model and choose within budget.

    Args:
        model: the attached Functional model (backbone frozen, head trainable;
            a new head already fitted by `fit_head`, so the scores measure
            what the head alone cannot do).
        head_layers: the head's layers (trainable; not candidates).
        header, x, y, loss: from `prepare(model, data, budget)`.

    Returns:
        dict: the plan (`chosen` items, `budget`, `head_params`, ...).
    """
    items = score(model, candidates(model, head_layers), x, y, loss)
    chosen = choose(items, header["budget"] - header["head_params"])
    return {
        **header,
        "trainable_params": header["head_params"] + sum(c["params"] for c in chosen),
        "samples": int(len(x)),
        "chosen": chosen,
    }


def adapter_plan(plan):
    """The part of `plan` `keras_microtune.adapters.apply_placement` applies."""
    out = {"lora": {}, "bias": [], "norm": []}
    for item in plan["chosen"]:
        if item["kind"] == "lora":
            out["lora"][item["layer"]] = item["rank"]
        elif item["kind"] in ("bias", "norm"):
            out[item["kind"]].append(item["layer"])
    return out


def apply_plan(model, plan):
    """Make the chosen items trainable, in place; record the plan on `model`.

    LoRA, biases and norms go through `adapters.apply_placement` (Keras'
    `enable_lora`; layers stay frozen, so BatchNorm keeps inference mode);
    a chosen depthwise kernel is flagged trainable itself.
    """
    from keras_microtune.adapters import apply_placement

    apply_placement(model, adapter_plan(plan))
    for item in plan["chosen"]:
        if item["kind"] == "kernel":
            find_layer(model, item["layer"]).kernel.trainable = True
    model._kmt_placement = json.dumps(plan)
    if "budget" in plan:
        logger.info("placement: %s", format_plan(plan))
    return model


def format_plan(plan):
    parts = [
        f"{c['layer']}:{c['kind']}" + (f"(r={c['rank']})" if c["rank"] else "")
        for c in plan["chosen"]
    ]
    return (
        f"{plan['trainable_params']:,} of {plan['budget']:,} budgeted parameters "
        f"(head {plan['head_params']:,}): " + (", ".join(parts) or "head only")
    )


def _observed(model):
    """What trains in `model` now, read from its layers and variables."""
    chosen = []
    for top in model.layers:
        leaves = [] if isinstance(top, keras.Model) else sublayers(top)
        for key, layer in [(top.name, top)] + [
            (f"{top.name}/{x.name}", x) for x in leaves
        ]:
            own = layer._trainable_variables + layer._non_trainable_variables
            if getattr(layer, "lora_enabled", False):
                chosen.append(
                    {
                        "layer": key,
                        "kind": "lora",
                        "rank": layer.lora_rank,
                        "params": _size(layer.lora_kernel_a)
                        + _size(layer.lora_kernel_b),
                    }
                )
            for kind, names in (
                ("kernel", ("kernel",)),
                ("bias", ("bias",)),
                ("norm", ("gamma", "beta")),
            ):
                size = sum(_size(v) for v in own if v.trainable and v.name in names)
                if size:
                    chosen.append(
                        {"layer": key, "kind": kind, "rank": None, "params": size}
                    )
    total = sum(_size(v) for v in model.trainable_weights)
    return {"trainable_params": total, "chosen": chosen, "recorded": False}


def placement_report(model):
    """What trains in a model from `kmt.attach()`, and why (a dict).

    For `attach(..., budget=..., data=...)` this is the recorded plan (not
    saved in `.keras` files): `budget`, `full_params`, `head_params`,
    `trainable_params`, `samples` and `chosen`, one entry per item
    (`layer`, `kind` in "lora"/"kernel"/"bias"/"norm", `rank`, `params`, and
    `gain`, its first-order loss decrease), and `head_fit` when a new head
    was fitted on `data` first (`samples`, `epochs`, its loss `before` and
    `after`). For any other model (the default
    placement, a reloaded one) it is read from the model's layers:
    `trainable_params` and `chosen` (every layer with LoRA or trainable
    kernels, biases or norms, the head included), with `recorded: False`.

    Args:
        model: keras.Model, typically returned by `kmt.attach`.

    Returns:
        dict.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> backbone = keras.Sequential([
    ...     keras.Input((16, 3)),
    ...     kmt.layers.FeatureStage([8, 16], name="features"),
    ...     kmt.layers.EmbeddingStage(),
    ...     kmt.layers.OutputStage(5),
    ... ])
    >>> x = np.random.default_rng(0).normal(size=(32, 16, 3)).astype("float32")
    >>> y = np.arange(32) % 3
    >>> model = kmt.attach(backbone, num_classes=3, budget=200, data=(x, y))
    >>> kmt.placement_report(model)["trainable_params"] <= 200
    True
    """
    text = getattr(model, "_kmt_placement", None)
    return _observed(model) if text is None else json.loads(text)
