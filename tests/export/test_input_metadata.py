"""Issue 18.1: a saved device model says how raw values are fed.

The scenario: a model starting with `Normalization(axis=None)`, fed sensor-like
raw values (digits scaled x*300+2000), converted for `mcu`. The normalization
is folded into the input quantization, so the file's input tensor is in
normalized units; its `keras_microtune.input` metadata says how raw values
become integers, and every way of evaluating the file reads it.
"""

import json

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import keras_microtune as kmt
from keras_microtune import cli
from keras_microtune.export import InvalidModelError, _tflite, input_metadata, runtimes

ARENA = 1 << 20


@pytest.fixture(scope="module")
def sensor(tmp_path_factory):
    """(result, saved folder, raw test x, test y, float accuracy)."""
    digits = load_digits()
    x = (digits.data * 300 + 2000).astype("float32")  # Raw counts, 2000..6800.
    y = digits.target.astype("int32")
    keras.utils.set_random_seed(0)
    norm = keras.layers.Normalization(axis=None)
    norm.adapt(x[:1200])
    model = keras.Sequential(
        [
            keras.Input((64,)),
            norm,
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1200], y[:1200], epochs=4, batch_size=32, verbose=0)
    x_test, y_test = x[1200:1500], y[1200:1500]
    float_acc = float(np.mean(np.asarray(model(x_test)).argmax(1) == y_test))
    result = kmt.convert(model, "mcu", representative_data=x[:200], verbose=0)
    folder = tmp_path_factory.mktemp("sensor") / "out"
    result.save(folder)
    return result, folder, x_test, y_test, float_acc


def _without_entry(data):
    """`data` with the keras_microtune.input entry removed (as files had it)."""
    import flatbuffers

    schema = _tflite._schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    for m in model.metadata:
        if m.name.decode() == input_metadata.NAME:
            model.buffers[m.buffer].data = None
    model.metadata = [
        m for m in model.metadata if m.name.decode() != input_metadata.NAME
    ] or None
    model.buffers = [_tflite._AlignedBuffer(b.data) for b in model.buffers]
    builder = flatbuffers.Builder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _with_entry(data, entry):
    return _tflite.with_metadata(data, input_metadata.NAME, json.dumps(entry).encode())


def _device_accuracy(tflite, q, y):
    raw = runtimes.tflm_run(tflite, [q], ARENA)[0]
    return float(np.mean(raw.argmax(1) == y))


def test_raw_data_against_the_saved_file_gives_the_device_accuracy(sensor, capsys):
    result, folder, x, y, float_acc = sensor
    assert result.report["input"]["preprocessing"]["folded"]
    device = _device_accuracy(result.tflite, result.quantize_input(x), y)
    assert device > 0.8 and device >= float_acc - 0.03
    path = folder / "model.tflite"
    assert kmt.evaluate(result, x, y, runtime="tflm")["accuracy"] == device
    assert kmt.evaluate(str(path), x, y, runtime="tflm")["accuracy"] == device
    assert kmt.evaluate(path.read_bytes(), x, y)["accuracy"] == device
    assert kmt.evaluate(str(path), x, y, runtime="litert")["accuracy"] > 0.8
    np.savez(folder.parent / "raw.npz", x=x, y=y)
    code = cli.main(
        ["evaluate", str(path), "--data", str(folder.parent / "raw.npz"), "--json"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == device
    # The same file without the entry is fed by its tensor's own quantization:
    # the raw counts saturate the input, as every file did before the entry.
    bare = _without_entry(result.tflite)
    assert kmt.evaluate(bare, x, y)["accuracy"] < 0.3


def test_entry_is_in_the_file_and_survives_save_strip_and_inspect(sensor, capsys):
    result, folder, x, _, _ = sensor
    saved = (folder / "model.tflite").read_bytes()
    assert saved == result.tflite
    assert input_metadata.NAME in _tflite.parse(saved).metadata
    stripped = _tflite.strip(saved)
    assert input_metadata.read(stripped) == input_metadata.read(saved)
    feed = result.report["input"]
    assert feed == input_metadata.read(saved)
    assert feed["metadata"] == {
        "name": "keras_microtune.input",
        "version": 1,
        "bytes": feed["metadata"]["bytes"],
    }
    names = [p["name"] for p in result.report["passes"]]
    assert names.index("memory_plan") + 1 == names.index("input_metadata")
    record = result.report["passes"][names.index("input_metadata")]
    assert record["bytes_after"] == len(saved)  # The last flatbuffer rewrite.
    assert record["added_bytes"] == record["bytes_after"] - record["bytes_before"]
    entry = json.loads(_tflite.metadata(saved, input_metadata.NAME))
    assert entry["version"] == 1 and entry["input"] == 0
    assert entry["preprocessing"]["kinds"] == ["Normalization"]
    assert entry["preprocessing"]["ops"] == []
    assert entry["zero_point"] != round(entry["zero_point"])  # Fractional.
    assert (
        entry["raw_min"] <= 2000 + entry["scale"]
        and entry["raw_max"] >= 6800 - entry["scale"]
    )
    inspected = kmt.inspect(str(folder / "model.tflite"))
    assert inspected.report["input"] == feed
    np.testing.assert_array_equal(inspected.quantize_input(x), result.quantize_input(x))
    assert cli.main(["inspect", str(folder / "model.tflite")]) == 0
    out = capsys.readouterr().out
    assert "device input" in out and "folded" in out
    assert "input metadata" in out and "keras_microtune.input version 1" in out
    saved_report = json.loads((folder / "report.json").read_text())
    assert saved_report["input"] == feed


def test_tflite_micro_runs_the_file_and_the_entry_costs_no_arena(sensor):
    result, _, x, _, _ = sensor
    bare = _without_entry(result.tflite)
    with_entry = runtimes.measure_arena(result.tflite)
    without = runtimes.measure_arena(bare)
    assert with_entry["arena_bytes"] == without["arena_bytes"] == result.arena_bytes
    q = result.quantize_input(x[:16])
    a = runtimes.tflm_run(result.tflite, [q], result.arena_bytes)[0]
    b = runtimes.tflm_run(bare, [q], result.arena_bytes)[0]
    np.testing.assert_array_equal(a, b)
    extra = len(result.tflite) - len(bare)
    assert 0 < extra <= result.report["input"]["metadata"]["bytes"] + 128, extra


def test_unknown_version_is_a_clear_error_not_a_wrong_result(sensor, tmp_path, capsys):
    result, _, x, y, _ = sensor
    entry = json.loads(_tflite.metadata(result.tflite, input_metadata.NAME))
    future = _with_entry(result.tflite, {**entry, "version": 3, "gain": 3})
    with pytest.raises(ValueError, match="version 3; keras_microtune .* reads ver"):
        kmt.evaluate(future, x, y)
    with pytest.warns(kmt.KerasMicrotuneWarning, match="pip install -U"):
        inspected = kmt.inspect(future)
    assert inspected.report["input"]["metadata"]["supported"] is False
    with pytest.raises(ValueError, match="version 3"):
        inspected.quantize_input(x)
    path = tmp_path / "future.tflite"
    path.write_bytes(future)
    np.savez(tmp_path / "raw.npz", x=x, y=y)
    code = cli.main(["evaluate", str(path), "--data", str(tmp_path / "raw.npz")])
    assert code == 2
    assert "version 3" in capsys.readouterr().err
    # Fields a reader does not know are ignored within a version.
    extended = _with_entry(result.tflite, {**entry, "comment": "new field"})
    assert input_metadata.read(extended)["scale"] == entry["scale"]


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\xff not json", "not JSON"),
        (b"[" * 30_000 + b"]" * 30_000, "not JSON"),
        (b'{"dtype": "int8"}', "integer 'version'"),
        (b'{"version": true}', "integer 'version'"),
        ({"scale": -1.0}, "invalid 'scale'"),
        ({"scale": "1"}, "invalid 'scale'"),
        ({"zero_point": float("nan")}, "invalid 'zero_point'"),
        ({"dtype": "float32"}, "invalid 'dtype'"),
        ({"shape": [1, 65]}, "changed after conversion"),
        ({"dtype": "uint8"}, "changed after conversion"),
        ({"input": 3}, "invalid 'input'"),
        ({"preprocessing": {"layers": "x"}}, "invalid 'preprocessing'"),
        # Per-channel lists: version 2 only, one number per channel, all four.
        ({"scale": [0.1] * 64}, "invalid 'scale'"),
        ({"version": 2, "scale": [0.1] * 3}, "invalid 'scale'"),
        ({"version": 2, "scale": [0.1] * 64}, "invalid 'scale'"),
        (b" " * (input_metadata.MAX_BYTES + 1), "more than the 65,536"),
    ],
)
def test_corrupted_entries_raise_documented_error(sensor, payload, match):
    result = sensor[0]
    if isinstance(payload, dict):
        entry = json.loads(_tflite.metadata(result.tflite, input_metadata.NAME))
        payload = json.dumps({**entry, **payload}).encode()
    data = _tflite.with_metadata(result.tflite, input_metadata.NAME, payload)
    with pytest.raises(InvalidModelError, match=match):
        kmt.inspect(data)
    with pytest.raises(InvalidModelError, match=match):
        kmt.evaluate(data, sensor[2][:4], sensor[3][:4])


def test_files_without_preprocessing_carry_no_entry(mcu_results):
    result = mcu_results["conv1d"]
    assert input_metadata.read(result.tflite) is None
    assert input_metadata.NAME not in _tflite.parse(result.tflite).metadata
    assert "input" not in kmt.inspect(result.tflite).report
