"""Fixtures shared by the callback tests."""

import keras
import pytest


class _InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


@pytest.fixture
def interrupt_at():
    """`interrupt_at(epoch)`: a callback raising RuntimeError("interrupted")
    as `epoch` begins, to cut a `fit` short for a `BackupAndRestore` resume."""
    return _InterruptAt
