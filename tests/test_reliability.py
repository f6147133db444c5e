"""Issue 8: bad input gets a clear error before any file is written, nothing is
lost or half-written, results are reproducible."""

import builtins
import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_microtune as kmt
from keras_microtune import cli
from keras_microtune.export import InvalidModelError, _tflite, converter

X = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")


def _tiny():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ],
        name="tiny",
    )


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def tiny_result(tiny):
    return kmt.convert(tiny, "mcu", representative_data=X, verbose=0)


@pytest.fixture(scope="module")
def tiny_files(tiny_result):
    return tiny_result.files()


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, tiny):
    """Model and data files for the CLI, good and bad."""
    tmp = tmp_path_factory.mktemp("cli_inputs")
    tiny.save(tmp / "m.keras")
    np.savez(tmp / "calib.npz", x=X)
    nan = X.copy()
    nan[5, 2] = np.nan
    np.savez(tmp / "nan.npz", x=nan)
    np.savez(tmp / "shape.npz", x=X[:, :4])
    np.savez(tmp / "text.npz", x=np.full((4, 6), "a"))
    np.savez(tmp / "empty.npz", x=np.zeros((0, 6), "float32"))
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(str(tmp / "pwned"))
    np.savez(tmp / "pickled.npz", x=evil)
    lam = keras.Sequential([keras.Input((6,)), keras.layers.Lambda(lambda t: t * 2)])
    lam.save(tmp / "lambda.keras")
    _lstm().save(tmp / "lstm.keras")
    (tmp / "garbage.keras").write_bytes(b"garbage")
    (tmp / "empty.tflite").write_bytes(b"")
    (tmp / "text.tflite").write_bytes(b"hello, not a model")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("user data")
    (tmp / "a_file").write_text("not a folder")
    return tmp


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _lstm(unroll=False):
    return keras.Sequential(
        [
            keras.Input((8, 4)),
            keras.layers.Masking(name="pad_mask"),
            keras.layers.LSTM(4, unroll=unroll, name="my_lstm"),
            keras.layers.Dense(2, name="head"),
        ]
    )


# --- convert(): bad calibration data ----------------------------------------


def _nan():
    x = X.copy()
    x[3, 1] = np.nan
    return x


def _inf():
    x = X.copy()
    x[7, 0] = -np.inf
    return x


@pytest.mark.parametrize(
    "data, error, match",
    [
        (_nan(), ValueError, r"NaN in sample 3, channel 1.*kmt.data.clean"),
        (_inf(), ValueError, r"Inf in sample 7, channel 0"),
        (X[:, :5], ValueError, r"axis 1 is 5, expected 6"),
        (X[:, :, None], ValueError, r"shape \(32, 6, 1\); the model expects \(N, 6\)"),
        (np.full((4, 6), "a"), TypeError, r"dtype <U1; expected a numeric"),
        (X.astype(object), TypeError, r"dtype object"),
        (np.zeros((0, 6), "float32"), ValueError, r"empty: it holds 0 samples"),
        (iter([]), ValueError, r"empty: it yielded no samples"),
        ({"x": X}, TypeError, r"Received: dict with keys \[.x.\]"),
    ],
    ids=["nan", "inf", "shape", "rank", "text", "object", "empty", "empty-gen", "dict"],
)
def test_bad_calibration_data_fails_before_any_file(tiny, tmp_path, data, error, match):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        kmt.convert(tiny, "mcu", representative_data=data, output_dir=out, verbose=0)
    assert os.listdir(tmp_path) == []


# --- convert(): models TFLite Micro cannot run ------------------------------


@pytest.mark.parametrize("target", ["mcu", "mobile-int8"])
def test_masked_recurrent_layer_refused_before_conversion(target, tmp_path):
    # LSTMs convert (fused or unrolled), but TFLite Micro has no masked
    # recurrent kernel: refuse before converting, naming both layers.
    x = np.zeros((4, 8, 4), "float32")
    match = r"\['pad_mask'\] produce a mask.*\['my_lstm'\].*pad every sequence"
    with pytest.raises(ValueError, match=match):
        kmt.convert(_lstm(), target, representative_data=x, output_dir=tmp_path / "o")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("target", ["mcu", "mobile-int8"])
def test_loop_layers_named_before_conversion(target, tmp_path):
    # TFLite's int8 converter segfaults on a TensorFlow while loop (here a
    # custom layer's; recurrent layers are lowered first): the check must
    # refuse it before converting, naming the layer and op.
    class Loop(keras.layers.Layer):
        def call(self, x):
            return keras.ops.fori_loop(0, 3, lambda i, v: v * 0.5 + x, x)

    model = keras.Sequential([keras.Input((4,)), Loop(name="my_loop")])
    x = np.zeros((4, 4), "float32")
    with pytest.raises(ValueError, match=r"\['my_loop'\].*While"):
        kmt.convert(model, target, representative_data=x, output_dir=tmp_path / "o")
    assert os.listdir(tmp_path) == []


def test_unsupported_tf_op_on_mcu_names_layer_and_op(tmp_path):
    class Det(keras.layers.Layer):
        def call(self, x):
            return tf.reshape(tf.linalg.det(tf.reshape(x, (-1, 2, 2))), (-1, 1))

    inp = keras.Input((4,))
    model = keras.Model(inp, Det(name="det_layer")(inp))
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    with pytest.raises(ValueError, match=r"MatrixDeterminant.*det_layer"):
        kmt.convert(model, "mcu", representative_data=x, output_dir=tmp_path / "o")
    assert os.listdir(tmp_path) == []


def test_forbidden_mcu_ops_name_their_layers():
    tensors = [
        _tflite.TensorInfo(0, "serving_default_x:0", "int8", (1, 4), False),
        _tflite.TensorInfo(1, "model/my_rnn/while;model/my_rnn/x", "int8", (1, 4), 0),
    ]
    info = _tflite.ModelInfo(64, [("WHILE", [0], [1])], tensors, [0], [1], 3, 0, [])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="my_rnn")])
    with pytest.raises(ValueError, match=r"\['WHILE'\] \(layers \['my_rnn'\]\)"):
        converter._check_mcu_ops(info, kmt.targets.get("mcu"), None, model)


def test_layer_normalization_runs_in_tflite_micro():
    # Not an error: lowered to MEAN/SUB/L2_NORMALIZATION (test_lowering.py),
    # full int8 without the float NEG of Keras' form; verified against LiteRT.
    # Asked for in float32 (precision=...), it runs in TFLite Micro in float.
    model = keras.Sequential(
        [
            keras.Input((8, 4)),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    x = np.random.default_rng(0).normal(size=(16, 8, 4)).astype("float32")
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    assert "L2_NORMALIZATION" in result.ops and result.report["verified"]
    assert "DEQUANTIZE" not in result.ops
    result = kmt.convert(
        model, "mcu", representative_data=x, precision={"norm": "float32"}, verbose=0
    )
    assert result.report["verified"]
    assert result.report["precision"]["norm"] == "float32"


# --- convert(): output locations ---------------------------------------------


def test_non_empty_output_refused_before_converting(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")

    def never(*args, **kwargs):
        raise AssertionError("converted before checking the output folder")

    monkeypatch.setattr(converter, "_tflite_convert", never)
    with pytest.raises(FileExistsError, match=r"not empty; pass overwrite=True"):
        kmt.convert(tiny, "mcu", representative_data=X, output_dir=out)
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        kmt.convert(tiny, "mcu", representative_data=X, output_dir=out / "keep.txt")
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _read_only_folder(tmp_path):
    """A real read-only location: a 0o555 folder, or /sys when running as root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    try:  # root ignores permission bits; sysfs refuses new folders.
        os.mkdir("/sys/kmt_probe")
    except OSError:
        return "/sys"
    os.rmdir("/sys/kmt_probe")
    pytest.skip("no read-only location available")


def test_read_only_location_is_a_clear_error(tiny_result, tiny_files, tmp_path):
    ro = _read_only_folder(tmp_path)
    target = os.path.join(ro, "out")
    before = sorted(os.listdir(ro))
    with pytest.raises(OSError, match="Cannot write the output folder"):
        converter.save_files(tiny_files, target)
    with pytest.raises(OSError, match="Cannot write the output folder"):
        tiny_result.save(target)
    assert sorted(os.listdir(ro)) == before


def test_read_only_location_checked_before_converting(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # As if read-only.
    with pytest.raises(PermissionError, match="is not a writable folder"):
        kmt.convert(tiny, "mcu", representative_data=X, output_dir=tmp_path / "o")
    assert os.listdir(tmp_path) == []


def test_symlinked_output_is_resolved_and_reported(tiny_result, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    path = tiny_result.save(link)
    assert path == str(real.resolve()) == tiny_result.output_dir
    assert link.is_symlink() and os.path.realpath(link) == path
    assert (real / "model.tflite").read_bytes() == tiny_result.tflite


def test_nothing_written_outside_the_output_folder(tiny_result, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    hostile = type(tiny_result)(
        tflite=tiny_result.tflite, report=tiny_result.report, name="../../x"
    )
    hostile.save(out)
    written = sorted(
        os.path.relpath(os.path.join(root, f), tmp_path)
        for root, _, files in os.walk(tmp_path)
        for f in files
    )
    assert all(w.startswith(os.path.join("a", "b", "out") + os.sep) for w in written)
    for name in ("../x", "/tmp/x", "", "..", "sub/x"):
        with pytest.raises(ValueError, match="outside the output folder"):
            converter.save_files({"ok.txt": b"", name: b"x"}, tmp_path / "o2")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "x").exists()


# --- Nothing lost: a failure at every write ----------------------------------


def _snapshot(path):
    if not path.exists():
        return None
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failure_at_each_write_leaves_destination_as_it_was(
    tiny_files, tmp_path, monkeypatch, error, existing
):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_bytes(b"previous run")
    before = _snapshot(out)
    real_open, real_rename = builtins.open, os.rename
    steps = len(tiny_files) + (2 if existing else 1)  # writes, then renames
    for fail_at in range(1, steps + 1):
        calls = []

        def counted(fn, *args, _calls=calls, _at=fail_at, **kwargs):
            _calls.append(args[0])
            if len(_calls) == _at:
                raise error("injected failure")
            return fn(*args, **kwargs)

        def flaky_open(path, mode="r", *args, **kwargs):
            if "w" in mode:
                return counted(real_open, path, mode, *args, **kwargs)
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", flaky_open)
        monkeypatch.setattr(os, "rename", lambda a, b: counted(real_rename, a, b))
        with pytest.raises(error, match="injected failure"):
            converter.save_files(tiny_files, out, overwrite=True)
        monkeypatch.undo()
        assert len(calls) >= fail_at  # (+1: the rename that restores the old)
        assert _snapshot(out) == before, f"failure at step {fail_at}"
        assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])
    converter.save_files(tiny_files, out, overwrite=True)  # And then it works.
    assert _snapshot(out) == tiny_files


# --- Reproducible ------------------------------------------------------------


def test_same_model_data_seed_gives_identical_bytes_and_report(tiny_result, tmp_path):
    again = kmt.convert(_tiny(), "mcu", representative_data=X, verbose=0)
    assert again.tflite == tiny_result.tflite
    assert again.report == tiny_result.report  # The report holds no timings.
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_result.save(a)
    again.save(b)
    assert _snapshot(a) == _snapshot(b)


def test_parallel_cli_runs_write_identical_files(cli_inputs, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keras_microtune.cli",
                "convert",
                str(cli_inputs / "m.keras"),
                "--calibration",
                str(cli_inputs / "calib.npz"),
                "-o",
                str(tmp_path / name),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert a == b and "model.tflite" in a and "report.json" in a
    assert outs[0][0] == outs[1][0]  # The printed reports too.


# --- CLI: exit code 2, one line, no traceback --------------------------------


def _cli_cases(d):
    m = str(d / "m.keras")
    calib = ["--calibration", str(d / "calib.npz")]
    return {
        "nan-calibration": (
            ["convert", m, "--calibration", str(d / "nan.npz")],
            "NaN in sample 5, channel 2",
        ),
        "wrong-shape": (
            ["convert", m, "--calibration", str(d / "shape.npz")],
            "axis 1 is 4, expected 6",
        ),
        "text-dtype": (
            ["convert", m, "--calibration", str(d / "text.npz")],
            "expected a numeric",
        ),
        "empty-calibration": (
            ["convert", m, "--calibration", str(d / "empty.npz")],
            "holds 0 samples",
        ),
        "pickled-npz": (
            ["convert", m, "--calibration", str(d / "pickled.npz")],
            "pickled (object) arrays",
        ),
        "missing-data": (
            ["convert", m, "--calibration", str(d / "nope.npz")],
            "No such data file",
        ),
        "lambda-model": (
            ["convert", str(d / "lambda.keras"), *calib],
            "--unsafe-deserialization",
        ),
        "lstm-model": (
            ["convert", str(d / "lstm.keras"), *calib],
            "['pad_mask'] produce a mask",
        ),
        "garbage-model": (
            ["convert", str(d / "garbage.keras"), *calib],
            "not a valid .keras file",
        ),
        "missing-model": (
            ["convert", str(d / "nope.keras"), *calib],
            "No such model file",
        ),
        "unknown-target": (
            ["convert", m, "-t", "cortex-m99", *calib],
            "expected one of",
        ),
        "non-empty-output": (
            ["convert", m, *calib, "-o", str(d / "full")],
            "--overwrite",
        ),
        "output-is-a-file": (
            ["convert", m, *calib, "-o", str(d / "a_file")],
            "is not a folder",
        ),
        "empty-tflite": (["inspect", str(d / "empty.tflite")], "empty (0 bytes)"),
        "text-tflite": (["inspect", str(d / "text.tflite")], "'TFL3' is missing"),
        "missing-tflite": (["inspect", str(d / "nope.tflite")], "No such .tflite"),
        "evaluate-pickled": (
            ["evaluate", m, "--data", str(d / "pickled.npz")],
            "pickled (object) arrays",
        ),
    }


_CLI_CASE_NAMES = sorted(_cli_cases(__import__("pathlib").Path(".")))


@pytest.mark.parametrize("case", _CLI_CASE_NAMES)
def test_cli_bad_input_exit_2_one_line(cli_inputs, capsys, case):
    argv, expected = _cli_cases(cli_inputs)[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-microtune: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err
    assert not (cli_inputs / "pwned").exists()
    assert os.listdir(cli_inputs / "full") == ["keep.txt"]


def test_cli_debug_shows_the_exception(cli_inputs):
    with pytest.raises(InvalidModelError, match="TFL3"):
        cli.main(["--debug", "inspect", str(cli_inputs / "text.tflite")])


def test_cli_reports_symlinked_output(cli_inputs, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    argv = ["convert", str(cli_inputs / "m.keras"), "--calibration"]
    argv += [str(cli_inputs / "calib.npz"), "-o", str(tmp_path / "link"), "--json"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"wrote {real.resolve()}" in err and "symbolic link" in err
    assert (real / "model.tflite").exists()


def test_pickle_payload_is_real(tmp_path):
    # Guard for the tests above: unpickled, the payload does write its marker.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()
    assert marker.exists()


def test_constant_logits_softmax_refused_before_tflite_micro_aborts(tmp_path):
    # Zero kernel and bias: the logits are 0 for every input, their int8 scale
    # is ~1e-8, and TFLite Micro's int8 SOFTMAX aborts the process in Prepare.
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(3, kernel_initializer="zeros", name="dead_head"),
            keras.layers.Softmax(name="probs"),
        ]
    )
    with pytest.raises(ValueError, match=r"int8 SOFTMAX aborts.*trained") as info:
        kmt.convert(model, "mcu", representative_data=X, output_dir=tmp_path / "o")
    assert "dead_head" in str(info.value) or "probs" in str(info.value)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    # The same model with live logits converts and runs.
    model.layers[0].set_weights(
        [np.random.default_rng(0).normal(size=(6, 3)).astype("float32"), np.zeros(3)]
    )
    assert kmt.convert(model, "mcu", representative_data=X, verbose=0).arena_bytes
