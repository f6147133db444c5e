"""Shared test set-up: quiet TensorFlow, two logical CPUs, seeded randomness."""

import os
import shutil
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices so tf.distribute.MirroredStrategy runs two replicas.
# This must happen before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the two logical CPUs for the whole session.

    Separate MirroredStrategy objects in one process can hand out the same
    collective instance keys, so a later test's all-reduce would meet an
    earlier model's gradients ("Shape mismatch in the collective instance").
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def cpp_compile():
    """`cpp_compile(sources, exe, *flags)`: build with g++ -std=c++17 -Wall -Werror.

    Skips the test where g++ is missing; raises with g++'s message on errors.
    """
    if shutil.which("g++") is None:
        pytest.skip("needs g++")

    def build(sources, exe, *flags):
        command = ["g++", "-std=c++17", "-Wall", "-Werror", *flags]
        command += [str(source) for source in sources] + ["-o", str(exe)]
        proc = subprocess.run(command, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return exe

    return build
