"""Every benchmark script runs in its tiny mode and prints its table.

Timing is not asserted: the machines are shared. The scripts run as
`python -m benchmarks.<name> --tiny` from the repository root, as `make bench`
runs them.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _table_rows(stdout, first_cell):
    return [ln for ln in stdout.splitlines() if ln.startswith(f"| {first_cell}")]


def _exists(module):
    return os.path.exists(os.path.join(ROOT, "benchmarks", f"{module}.py"))


@pytest.mark.slow  # A benchmark's tiny run; `make bench` runs it in full.
def test_conversion_table():
    out = _run("benchmarks.conversion", "--tiny")
    assert "| model | flatbuffer ours / plain (B) |" in out
    for name in ("ds_cnn", "four_stages"):
        (row,) = _table_rows(out, name)
        assert "failed" not in row and row.count("|") == 10, row


def test_run_all_writes_markdown_with_runtime_table(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    out = _run(
        "benchmarks.run_all", "--tiny", "--only", "runtime_speed", "--output", path
    )
    assert "wrote" in out
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "Machine: " in text and " CPUs (" in text and "GiB RAM" in text
    assert "## Table 4: Runtime speed" in text
    assert "`python -m benchmarks.runtime_speed --tiny`" in text
    rows = _table_rows(text, "ds_cnn") + _table_rows(text, "four_stages")
    assert len(rows) == 2 and all(row.count("|") == 8 for row in rows), rows
    assert "Reading: " in text and "Ethos-U55-128" in text
    assert "Table 1" not in text  # --only keeps the other tables out.


def test_only_replaces_the_named_tables_in_an_existing_file():
    from benchmarks import run_all

    text = (
        "# Benchmarks\n\nMachine: m.\n\n## Table 1: One\n\nold one\n\n"
        "## Table 2: Two\n\nold two\n\n## Table 3: Three\n\nold three\n"
    )
    result = {"command": "python -m benchmarks.two", "seconds": 3.0}
    result.update(table="| new | two |", reading="")
    out = run_all.splice(text, [("2", "Two", "two", "why", result)], "DAY")
    assert out.startswith("# Benchmarks\n\nMachine: m.\n\n## Table 1: One")
    assert "old one" in out and "old three" in out and "old two" not in out
    assert (
        out.index("## Table 1") < out.index("| new | two |") < out.index("## Table 3")
    )
    assert "Re-run on its own on DAY" in out and "Reading: why" in out


@pytest.mark.skipif(not _exists("quantization"), reason="not written yet")
@pytest.mark.slow  # A benchmark's tiny run; `make bench` runs it in full.
def test_quantization_table():
    from benchmarks.quantization import ROWS, TASKS

    out = _run("benchmarks.quantization", "--tiny")
    for task in TASKS:
        for name in ROWS:
            assert len(_table_rows(out, f"{task} | {name} |")) == 1, out


def test_transfer_table(tmp_path):
    from benchmarks.transfer import METHODS

    path = tmp_path / "rows.json"
    out = _run("benchmarks.transfer", "--tiny", "--json", path)
    for method in METHODS:
        (row,) = _table_rows(out, f"digits | {method} |")
        assert row.count("|") == 9 and " ± " in row, row
        assert len(_table_rows(out, f"suite average | {method} |")) == 1, out
    assert "Targets for `attach()`" in out
    rows = json.loads(path.read_text())["rows"]
    by_method = {r["method"]: r for r in rows}
    full = by_method["full"]
    # Counted from model.trainable_weights: fewer than full fine-tuning.
    for method in ("head", "bias+norm", "budget"):
        assert 0 < by_method[method]["trainable"] < full["trainable"], method
    assert all(0 <= a <= 1 for r in rows for a in r["accuracy"])
    # attach() is timed apart from fit (`data` and `budget` fit a head in it).
    assert all(len(r["attach_seconds"]) == len(r["fit_seconds"]) for r in rows)
    # Full fine-tuning is also timed through keras.Model.fit, once per seed.
    assert len(full["keras_fit_seconds"]) == len(full["fit_seconds"]), full
    assert all(s > 0 for s in full["keras_fit_seconds"]), full


@pytest.mark.slow  # A benchmark's tiny run.
def test_transfer_tune_lr_chooses_every_methods_rate(tmp_path):
    from benchmarks.transfer import FULL_LEARNING_RATES, LEARNING_RATE

    path = tmp_path / "rows.json"
    _run(
        "benchmarks.transfer",
        "--tiny",
        "--methods",
        "head",
        "--tune-lr",
        "--json",
        path,
    )
    (row,) = json.loads(path.read_text())["rows"]
    # Tiny mode tries the first rate only; without --tune-lr head keeps its own.
    assert row["lr"] == FULL_LEARNING_RATES[0] != LEARNING_RATE, row
    assert len(row["val_scores"]) == 1 and 0 <= row["val_scores"][0] <= 1, row


@pytest.mark.slow
@pytest.mark.skipif(not _exists("callbacks_overhead"), reason="not written yet")
def test_callbacks_overhead_table():
    from benchmarks.callbacks_overhead import NAMES

    out = _run("benchmarks.callbacks_overhead", "--tiny")
    for name in NAMES:
        (row,) = _table_rows(out, name + " ")
        assert row.count("|") == 8, row


@pytest.mark.slow
def test_sequence_table():
    out = _run("benchmarks.sequence", "--tiny")
    for name in (
        "lstm |",
        "lstm streaming",
        "gru |",
        "gru streaming",
        "transformer",
        "conv1d",
    ):
        (row,) = _table_rows(out, name)
        assert row.count("|") == 10, row
        assert row.endswith(("| yes |", "| NO |")), row
    (lstm,) = _table_rows(out, "lstm |")
    assert "| fused |" in lstm
    (gru,) = _table_rows(out, "gru |")
    assert "| unrolled |" in gru
    (streamed,) = _table_rows(out, "lstm streaming")
    assert "state in the fused op" in streamed


@pytest.mark.slow
def test_run_all_tiny_runs_every_table(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    _run("benchmarks.run_all", "--tiny", "--output", path, timeout=1200)
    text = path.read_text()
    assert "FAILED" not in text
    for number in ("1", "2", "4"):
        assert f"## Table {number}:" in text


def test_set_batchnorm_statistics_makes_inference_match_training_mode():
    import keras
    import numpy as np

    from benchmarks.zoo import set_batchnorm_statistics

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(momentum=0.999),
            keras.layers.ReLU(6.0),
            keras.layers.Conv2D(3, 3),
            keras.layers.BatchNormalization(momentum=0.999),
        ]
    )
    x = np.random.default_rng(0).normal(3.0, 5.0, (64, 6, 6, 2)).astype("float32")
    training = model(x, training=True).numpy()
    assert not np.allclose(model(x, training=False).numpy(), training, atol=1e-2)
    set_batchnorm_statistics(model, x)
    np.testing.assert_allclose(model(x, training=False).numpy(), training, atol=1e-4)
    norms = [layer for layer in model.layers if hasattr(layer, "moving_mean")]
    assert [layer.momentum for layer in norms] == [0.999, 0.999]


@pytest.mark.slow  # Pretrains MobileNetV2-0.35 (about a minute on 2 cores).
def test_mobilenet_transfer_backbone_is_accurate_in_inference_mode_and_converts():
    import keras_microtune as kmt
    from benchmarks import transfer_tasks as tasks

    data = tasks.load("mobilenet")
    model, accuracy = tasks.pretrain("mobilenet", data)
    # It scored chance (0.20) with the moving statistics left by fit.
    assert accuracy > 0.95, accuracy
    x, y = data["source"]
    result = kmt.convert(model, "mcu", representative_data=data["train"][0], verbose=0)
    int8 = kmt.evaluate(result, x[:200], y[:200], runtime="tflm")["accuracy"]
    assert int8 > 0.9, int8


def test_ptq_autoencoder_table():
    from benchmarks.ptq_autoencoder import ROWS

    out = _run("benchmarks.ptq_autoencoder", "--tiny")
    assert "anomaly AUC (%) in TFLite Micro" in out
    for name in ROWS:
        (row,) = _table_rows(out, f"autoencoder | {name} |")
        cells = [c.strip() for c in row.strip("|").split("|")]
        # Every path converts and runs in TFLite Micro: an AUC, not a reason.
        assert 0.0 <= float(cells[2]) <= 100.0, row
        if name == 'ours precision="auto"':  # `quantization.print_rows`' size.
            size, ratio = cells[4].split(" (")
            assert int(size.replace(",", "")) > 0 and ratio.endswith("x ours PTQ)")


@pytest.mark.slow  # A benchmark's tiny run (about 110 s); `make bench` runs it in full.
def test_compression_table():
    out = _run("benchmarks.compression", "--tiny")
    digits = _table_rows(out, "digits CNN")
    ds_cnn = _table_rows(out, "ds_cnn")
    assert [r.split("|")[2].strip() for r in digits + ds_cnn] == [
        "per-channel",
        "per-tensor",
    ] * 2
    for row in digits + ds_cnn:
        assert row.count("|") == 17, row
    # The digits CNN's kernels are most of its file: lut4 shrinks it.
    assert float(digits[0].split("|")[8]) < 0.7, digits
    # ds_cnn's depthwise kernels are too small for per-channel tables...
    assert "depthwise_conv_2d" in ds_cnn[0], ds_cnn
    # ...and fit one table per kernel: every kernel compressed per tensor.
    count, per_tensor = ds_cnn[1].split("|")[10].split()
    assert per_tensor == f"({count})" and int(count) >= 9, ds_cnn
