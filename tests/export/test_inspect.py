"""kmt.inspect(): the same report for an existing .tflite; bad files fail cleanly."""

import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import InvalidModelError


def test_inspect_matches_convert(mcu_results, tmp_path):
    result = mcu_results["residual"]
    path = tmp_path / "m.tflite"
    path.write_bytes(result.tflite)
    inspected = kmt.inspect(str(path), target="mcu")
    assert inspected.arena_bytes == result.arena_bytes
    assert inspected.ops == result.ops
    assert inspected.report["memory"] == result.report["memory"]
    assert inspected.report["budget"] == result.report["budget"]
    assert inspected.parity is None
    assert kmt.inspect(result.tflite).report["target"]["name"] == "mcu"
    small = kmt.inspect(result.tflite, target="cortex-m0plus")
    assert small.report["budget"]["ram_bytes"] == 32 * 1024


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"", "empty"),
        (lambda b: b[: len(b) // 2], "Corrupted or truncated"),
        (lambda b: b"PK\x03\x04 not a model at all", "TFL3"),
        (lambda b: b[:4] + b"XXXX" + b[8:], "TFL3"),
    ],
)
def test_bad_files_raise_documented_error(mcu_results, mutate, match):
    with pytest.raises(InvalidModelError, match=match):
        kmt.inspect(mutate(mcu_results["conv1d"].tflite))


def test_byte_flips_never_crash_the_caller(mcu_results):
    data = mcu_results["conv1d"].tflite
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(12):
        flipped = bytearray(data)
        for pos in rng.integers(0, 256, 3):  # The header and table offsets.
            flipped[pos] ^= 0xFF
        try:
            kmt.inspect(bytes(flipped))
            outcomes["ok"] += 1
        except InvalidModelError:
            outcomes["error"] += 1
    assert sum(outcomes.values()) == 12
    assert outcomes["error"] > 0
