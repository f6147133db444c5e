"""PruningSchedule: check, follow and log magnitude pruning during fit."""

import warnings

import keras
import numpy as np

from keras_microtune._api import KerasMicrotuneWarning
from keras_microtune.callbacks._base import sublayers

TOLERANCE = 0.01  # Warn when the model ends more than 1 point below its schedule.


def _wrappers(model):
    from keras_microtune.optimize import PruneLowMagnitude

    return [layer for layer in sublayers(model) if isinstance(layer, PruneLowMagnitude)]


class PruningSchedule(keras.callbacks.Callback):
    """Drive and log the pruning of a `kmt.optimize.prune_low_magnitude` model.

    The Keras 3 equivalent of tfmot's `UpdatePruningStep` plus
    `PruningSummaries`. Each `PruneLowMagnitude` wrapper advances its
    `pruning_step` variable and recomputes its masks inside the compiled
    train step (every `frequency` steps of its polynomial schedule), so masks
    follow every step, also with `steps_per_execution > 1`. This callback
    checks the model is prunable when training begins, re-applies all masks
    when an epoch ends and training ends (pruned weights are exactly zero in
    checkpoints and exports), and writes `"sparsity"` (fraction of zeros over
    all pruned kernels) and `"pruning_step"` to the epoch `logs`. The step
    counters and masks are model weights, so `BackupAndRestore` restores the
    schedule. With `update_masks_on_epoch_end=True`, the first epoch of a
    resumed `fit` (a `BackupAndRestore` resume, or `initial_epoch > 0`)
    begins by recomputing the masks at the restored step: `BackupAndRestore`
    listed before this callback saves the weights before the epoch-end
    update, and the resumed run would otherwise train one epoch with older
    masks than an uninterrupted run.

    When training ends, a `KerasMicrotuneWarning` says so if the masks hold
    more than 1 point less sparsity than the schedule promises at the last
    step trained (masks are recomputed every `frequency` steps and at
    `end_step`, so this happens when `end_step` lies beyond the steps trained
    and `frequency` is coarse), with the steps involved and what to change.

    Args:
        update_masks_on_epoch_end: bool. Recompute the masks at the current
            step at each epoch end instead of only re-applying them (useful
            with a `frequency` longer than an epoch). Defaults to `False`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    >>> pruned = kmt.optimize.prune_low_magnitude(
    ...     model, target_sparsity=0.5, end_step=2, frequency=1)
    >>> pruned.compile("adam", "mse")
    >>> history = pruned.fit(np.ones((8, 8)), np.ones((8, 8)), epochs=2,
    ...                      batch_size=4, callbacks=[kmt.callbacks.PruningSchedule()],
    ...                      verbose=0)
    >>> history.history["sparsity"][-1]
    0.5
    """

    def __init__(self, update_masks_on_epoch_end: bool = False):
        super().__init__()
        if not isinstance(update_masks_on_epoch_end, bool):
            raise ValueError(
                "Received an invalid value for `update_masks_on_epoch_end`, "
                "expected a bool. "
                f"Received: update_masks_on_epoch_end={update_masks_on_epoch_end!r}"
            )
        self.update_masks_on_epoch_end = update_masks_on_epoch_end
        self._wrappers = []
        self._first_epoch = True

    def on_train_begin(self, logs=None):
        self._wrappers = _wrappers(self.model)
        if not self._wrappers:
            raise ValueError(
                f"PruningSchedule: model {self.model.name!r} has no pruning "
                "wrappers. Make it prunable first: `model = "
                "kmt.optimize.prune_low_magnitude(model, target_sparsity=...)`, "
                "then compile and fit that model with this callback."
            )
        self._first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch and epoch > 0 and self.update_masks_on_epoch_end:
            self._apply()  # Resumed: redo the epoch-end update a backup missed.
        self._first_epoch = False

    def _apply(self):
        for wrapper in self._wrappers:
            if self.update_masks_on_epoch_end:
                wrapper.update_masks(force=True)
            else:
                wrapper.apply_masks()

    def sparsity(self) -> float:
        """Fraction of zeros over every kernel the wrappers prune."""
        zeros = total = 0
        for wrapper in self._wrappers:
            for mask in wrapper.masks:
                values = keras.ops.convert_to_numpy(mask)
                zeros += int(np.sum(values == 0))
                total += values.size
        return zeros / total if total else 0.0

    def on_epoch_end(self, epoch, logs=None):
        self._apply()
        if logs is not None:
            logs["sparsity"] = self.sparsity()
            logs["pruning_step"] = float(self._wrappers[0].pruning_step.numpy())

    def on_train_end(self, logs=None):
        for wrapper in self._wrappers:
            wrapper.apply_masks()
        self._check_schedule()

    def _check_schedule(self):
        """Warn when the masks end below what the schedule promised by now."""
        zeros = promised = total = 0
        worst, worst_gap = None, 0.0
        for wrapper in self._wrappers:
            step = int(wrapper.pruning_step.numpy()) - 1  # The last step trained.
            if step < 0:
                continue
            sparsity = float(wrapper.sparsity_at(step))
            for mask in wrapper.masks:
                values = keras.ops.convert_to_numpy(mask)
                found, due = int(np.sum(values == 0)), round(sparsity * values.size)
                zeros, promised, total = (
                    zeros + found,
                    promised + due,
                    total + values.size,
                )
                if (due - found) / values.size > worst_gap:
                    worst, worst_gap = wrapper, (due - found) / values.size
        if not total or (promised - zeros) / total <= TOLERANCE:
            return
        warnings.warn(
            f"PruningSchedule: training ended at {zeros / total:.1%} sparsity, "
            f"{(promised - zeros) / total * 100:.1f} points below the "
            f"{promised / total:.1%} the "
            f"pruning schedule promises by the last step trained. " + _why(worst),
            KerasMicrotuneWarning,
            stacklevel=2,
        )


def _why(wrapper):
    """Why a wrapper's masks lag its schedule, and what to change."""
    step = int(wrapper.pruning_step.numpy()) - 1
    last = wrapper.last_update_step(step)
    if last is None:
        updated = "no mask update was due yet"
    else:
        updated = (
            f"the last update was at step {last} (sparsity "
            f"{float(wrapper.sparsity_at(last)):.1%})"
        )
    text = (
        f"Layer {wrapper.name!r}: masks are recomputed every "
        f"frequency={wrapper.frequency} steps from begin_step={wrapper.begin_step} "
        f"and at end_step={wrapper.end_step}; {updated} and training stopped at "
        f"step {step} (steps count from 0)."
    )
    if wrapper.end_step > step:
        text += (
            f" end_step={wrapper.end_step} is beyond the {step + 1} steps trained, "
            f"so the final update to target_sparsity={wrapper.target_sparsity} "
            f"never ran: use end_step <= {step}, or train longer."
        )
    return text + (
        " A smaller `frequency`, or PruningSchedule(update_masks_on_epoch_end=True), "
        "keeps the masks closer to the schedule."
    )
