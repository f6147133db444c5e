"""Model-graph helpers shared by quantize, prune and cluster.

The three rewrites clone a model layer by layer; this module owns what they
share: the input check (`check_model`), the Functional view of a Sequential
model (`as_functional`), per-layer copies (`clone_layer`, `copy_weights`),
the clone-and-map core (`rewrite`), the walk into nested models (`walk`),
each layer's node in one model's own graph (`layer_nodes`), the kernels that
pruning and clustering act on (`kernels`) and the constraint that keeps a
kernel under a 0/1 mask (`MaskConstraint`). It imports none of them.
"""

import keras


def is_graph_model(model):
    """True for Sequential and Functional models (those with a layer graph)."""
    if isinstance(model, keras.Sequential):
        return True
    try:
        config = model.get_config()
    except NotImplementedError:
        return False
    return isinstance(config, dict) and "input_layers" in config


def check_model(model, name):
    """Raise unless `model` is a built Keras model with known inputs.

    Args:
        model: the object passed by the user.
        name: str. The public function, e.g. `"quantize_model()"`, for the
            error message.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{name} expects a keras.Model. Received: model of type "
            f"{type(model).__name__}"
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"{name} needs a built Sequential or Functional model with known "
            f"inputs. Received: model={model.name!r} with no inputs; build it or "
            "call it on a keras.Input inside a Functional model."
        )


def clone_layer(layer, input_shape, name=None):
    """A copy of a built `layer` with its own weights."""
    config = layer.get_config()
    if name is not None:
        config["name"] = name
    copy = layer.__class__.from_config(config)
    copy.build(input_shape)
    copy_weights(layer, copy)
    copy.trainable = layer.trainable
    return copy


def copy_weights(layer, copy):
    """Give the built `copy` of `layer` its weights.

    Preprocessing layers derive their state from the weights (an adapted
    `Normalization` its mean and variance): `finalize_state` recomputes it,
    as Keras does after loading a saved model. `set_weights` alone leaves
    the copy normalizing with the statistics it was built with.
    """
    copy.set_weights(layer.get_weights())
    if hasattr(copy, "finalize_state"):
        copy.finalize_state()


def as_functional(model):
    """A Functional view of `model`: Sequential models are rebuilt (copies)."""
    if not isinstance(model, keras.Sequential):
        return model
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    x = inputs
    for layer in model.layers:
        x = clone_layer(layer, x.shape)(x)
    return keras.Model(inputs, x, name=model.name)


def rewrite(model, replace):
    """Clone a (Functional/Sequential) model, mapping each layer by `replace`.

    Args:
        model: keras.Model. Nested models are rewritten recursively.
        replace: callable `(layer, first input) -> layer` called once per
            layer; the returned layer is applied to the layer's inputs.
    """
    model = as_functional(model)
    done = {}

    def call_function(layer, *args, **kwargs):
        if id(layer) not in done:
            if isinstance(layer, keras.Model):
                done[id(layer)] = rewrite(layer, replace)
            elif isinstance(layer, keras.layers.Layer):
                done[id(layer)] = replace(layer, args[0])
            else:
                return layer(*args, **kwargs)
        return done[id(layer)](*args, **kwargs)

    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call_function
    )


def walk(model):
    """Every layer of `model`, nested models' layers (then the model) included."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from walk(layer)
        yield layer


def layer_nodes(model):
    """id(layer) -> its call (a Keras `Node`) in `model`'s own graph.

    A model made from another's layers (`rewrite`, a model cut out of
    another) shares them, and `layer.input`/`layer.output` are the first
    model's tensors; this model's nodes give its own. Layers called more than
    once in the model are left out.
    """
    graph = getattr(model, "_functional", None) or model
    out, seen = {}, set()
    for nodes in getattr(graph, "_nodes_by_depth", {}).values():
        for node in nodes:
            layer = node.operation
            if layer is None or node.is_input:
                continue
            if id(layer) in seen:  # Shared layer: no single call.
                out.pop(id(layer), None)
                continue
            seen.add(id(layer))
            out[id(layer)] = node
    return out


def kernels(layer):
    """The kernels of `layer` (weights named kernel, 2-D or more)."""
    return [v for v in layer.weights if "kernel" in v.name and len(v.shape) >= 2]


def state_constraints_supported():
    """True where a constraint may read other (non-trainable) variables.

    Keras' JAX trainer keeps the model state outside the variables during
    `fit` (`_purge_model_variables` sets their values to None) and runs the
    optimizer, and so `variable.constraint`, over the trainable variables
    only. A constraint reading a mask or a flag variable then reads None.
    On JAX the wrappers apply masks and flags in `call` instead (the values
    the model computes with are the same; the stored latent values may
    differ where masked), and `strip` applies them to the stored weights.
    """
    return keras.backend.backend() != "jax"


class MaskConstraint:
    """Multiply a kernel by its 0/1 mask after any original constraint.

    Not used on JAX (see `state_constraints_supported`).
    """

    def __init__(self, mask, constraint=None):
        self.mask = mask
        self.constraint = constraint

    def __call__(self, kernel):
        if self.constraint is not None:
            kernel = self.constraint(kernel)
        return kernel * self.mask
