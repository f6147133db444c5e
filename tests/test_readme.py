"""The README's quickstart runs as written (with fewer epochs)."""

import json
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "kmt.convert" in code and "kmt.attach" in code
    assert len(code.strip().splitlines()) <= 25
    code = re.sub(r"epochs=\d+", "epochs=1", code)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.fits and result.report["verified"]
    assert (tmp_path / "build" / "my_model" / "main.cc").exists()


def _section(title):
    text = README.read_text()
    return re.search(rf"### {title}\n(.*?)\n##+ ", text, re.S).group(1)


def _blocks(section, language):
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_input_entry_readers_match_the_entry(tmp_path, monkeypatch):
    """The Python reader runs on a real file and quantizes as keras_microtune
    does; the C++ and Kotlin readers use the schema's accessors and the
    entry's fields."""
    import keras
    import numpy as np

    import keras_microtune as kmt
    from keras_microtune.export import _tflite, input_metadata

    section = _section("Reading the input entry")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Rescaling(1 / 8.0, offset=-1.0),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    raw = np.random.default_rng(0).uniform(0, 16, (32, 8, 8, 1)).astype("float32")
    result = kmt.convert(model, "mcu", representative_data=raw, verbose=0)
    monkeypatch.chdir(tmp_path)
    result.save("digits_mcu")
    (python,) = _blocks(section, "python")
    namespace = {"raw": raw}
    exec(compile(python, str(README), "exec"), namespace)
    np.testing.assert_array_equal(namespace["q"], result.quantize_input(raw))

    entry = json.loads(_tflite.metadata(result.tflite, input_metadata.NAME))
    table = set(re.findall(r"^\| `(\w+)`", section, re.M))
    table |= set(re.findall(r"^\| `\w+`, `(\w+)`", section, re.M))
    assert table == set(entry), (table, set(entry))
    (cpp,) = _blocks(section, "cpp")
    (kotlin,) = _blocks(section, "kotlin")
    for code in (python, cpp, kotlin):
        assert f'"{input_metadata.NAME}"' in code
        fields = re.findall(r'(?:\["|getDouble\("|getInt\(")(\w+)"', code)
        assert set(fields) <= set(entry), fields
    schema = _tflite._schema()
    flatbuffer_api = {"c_str", "size", "data", "Get"}  # flatbuffers' own types.
    cpp_calls = set(re.findall(r"->(\w+)\(", cpp)) - flatbuffer_api
    kotlin_calls = set(re.findall(r"\.(\w+)\(", kotlin))
    kotlin_calls = {c.replace("AsByteBuffer", "") for c in kotlin_calls}
    kotlin_calls -= {"toInt", "decode", "toString", "getInt", "getDouble", "JSONObject"}
    classes = (schema.Model, schema.Metadata, schema.Buffer)
    for call in cpp_calls | kotlin_calls | {"GetModel"}:
        name = call[0].upper() + call[1:]
        if call == "GetModel":  # C++'s root accessor; Python's GetRootAs.
            name = "GetRootAs"
        assert any(hasattr(c, name) for c in classes), call
    assert "tflite::GetModel" in cpp and "Model.getRootAsModel" in kotlin
