"""Helpers shared by the callbacks: argument checks, schedules, retracing."""

import math
import numbers

# The recursive layer walk lives in `_api` (below the callbacks, so optimize
# and training can use it too); the callbacks and benchmarks import it here.
from keras_microtune._api import sublayers  # noqa: F401


def check_number(name, value, low=None, high=None, integer=False, low_open=False):
    """Raise a Keras-style ValueError unless `value` is a number in range."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        what = "an integer" if integer else "a finite number"
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        if bounds:
            what += " " + " and ".join(bounds)
        raise ValueError(
            f"Received an invalid value for `{name}`, expected {what}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_schedule(name, value, low=None, high=None):
    """Validate a value given as a number, a `(start, end)` pair or a callable.

    Returns the value unchanged; `schedule_value` evaluates it.
    """
    if callable(value):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected a number, a "
                "`(start, end)` pair or a callable `epoch -> value`. "
                f"Received: {name}={value!r}"
            )
        for item in value:
            check_number(name, item, low=low, high=high)
        return tuple(value)
    return check_number(name, value, low=low, high=high)


def schedule_value(value, epoch, epochs, start_epoch=0):
    """Evaluate a schedule given as in `check_schedule` at `epoch`.

    A `(start, end)` pair moves linearly from `start` at `start_epoch` to `end`
    at `start_epoch + epochs` and stays there.
    """
    if callable(value):
        return float(value(epoch))
    if isinstance(value, tuple):
        start, end = value
        if epochs in (None, 0):
            return float(end if epoch >= start_epoch else start)
        fraction = min(max((epoch - start_epoch) / epochs, 0.0), 1.0)
        return float(start + (end - start) * fraction)
    return float(value)


def retrace(model):
    """Make `fit` and `evaluate` retrace, so Python-level changes take effect.

    Keras compiles `train_step` once per `fit`; layer attributes read at trace
    time (`trainable`, a ReLU's `max_value`) only take effect after this.
    """
    model.make_train_function(force=True)
    model.make_test_function(force=True)
    model.predict_function = None


def base_optimizer(optimizer):
    """The optimizer that owns the variables (unwraps LossScaleOptimizer)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    return optimizer if inner is None else inner


def require_compiled(model, callback_name):
    if getattr(model, "optimizer", None) is None:
        raise ValueError(
            f"{callback_name} needs a compiled model: call `model.compile(...)` "
            "with an optimizer before `model.fit(...)`."
        )


def multi_worker_strategy(model):
    """`model`'s tf.distribute.MultiWorkerMirroredStrategy over several
    workers, else None."""
    strategy = getattr(model, "distribute_strategy", None)  # TensorFlow only.
    if strategy is None:
        return None
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    workers = sum(len(jobs.get(job, ())) for job in ("chief", "worker"))
    return strategy if workers > 1 else None


def from_chief(strategy, values):
    """The chief's `values` (a list of floats) on every worker: an all-reduce
    in which only the first replica (on the chief) contributes."""
    import tensorflow as tf

    mine = tf.constant(values, tf.float64)
    zeros = tf.zeros_like(mine)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: mine if context.replica_id_in_sync_group == 0 else zeros
    )
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return [float(v) for v in total.numpy()]
