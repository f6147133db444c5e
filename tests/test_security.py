"""Issue 11: untrusted models, data files and names never run code, never inject
into generated sources, never allocate what a hostile file claims."""

import os
import re
import struct
import subprocess
import time
import tracemalloc

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_microtune as kmt
from keras_microtune.export import InvalidModelError, _tflite, codegen, input_metadata

FUZZ_FLIPS = 400  # Seeded byte flips fed to inspect() (see RELIABILITY.md).
FUZZ_TRUNCATIONS = 100
FUZZ_HYPOTHESIS = 200
FUZZ_TFLM = 6  # Mutated files that parse, run in TFLite Micro's child process.


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ],
        name="tiny",
    )
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    return kmt.convert(model, "mcu", representative_data=x, verbose=0)


# --- Models that would run code on load ------------------------------------


def _lambda_model(marker):
    def side_effect(t):
        with open(marker, "w") as f:  # Runs if the model is ever deserialized.
            f.write("code ran")
        return t * 2

    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Lambda(side_effect, name="evil_lambda")]
    )


def test_keras_lambda_refused_names_layer_and_flag(tmp_path):
    marker = tmp_path / "marker"
    _lambda_model(marker).save(tmp_path / "lam.keras")
    os.remove(marker)  # Written while tracing for save; must not come back.
    with pytest.raises(ValueError) as info:
        kmt.convert(str(tmp_path / "lam.keras"), "float32", output_dir=tmp_path / "o")
    message = str(info.value)
    assert "evil_lambda" in message
    assert "safe_mode=False" in message and "--unsafe-deserialization" in message
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_h5_lambda_from_tf_keras_refused(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential(
        [
            tf_keras.Input((4,)),
            tf_keras.layers.Lambda(lambda t: t * 2, name="legacy_lambda"),
        ]
    )
    model.save(tmp_path / "lam.h5")
    with pytest.raises(ValueError, match=r"legacy_lambda.*--unsafe-deserialization"):
        kmt.convert(str(tmp_path / "lam.h5"), "float32")


def test_corrupt_keras_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a valid .keras file.*zip archive"):
        kmt.convert(str(bad), "float32")


# --- Generated C/C++ ---------------------------------------------------------

_HOSTILE = [
    'x*/ #include "evil.h" //',
    'quote " and backslash \\ end',
    "new\nline #define X 1",
    "??/ trigraph ??= and ??'",
    "non-ASCII: é ü ✓ 中文",
    "*/ /* // \\",
    "",
]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text())
def test_c_string_and_identifier_are_inert(text):
    literal = codegen.c_string(text)
    assert re.fullmatch(
        r'"(?:[A-Za-z0-9 _\-.,:;()\[\]{}<>=+!#%&|^~@$\']|\\[0-7]{3})*"', literal
    )
    assert "\n" not in literal and "*/" not in literal and "??" not in literal
    assert bytes(
        int(m[1:], 8) if m.startswith("\\") else ord(m)
        for m in re.findall(r"\\[0-7]{3}|.", literal[1:-1])
    ) == text.encode("utf-8")
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", codegen.c_identifier(text))


def test_hostile_labels_compile_with_werror(tmp_path, cpp_compile):
    labels = ", ".join(codegen.c_string(s) for s in _HOSTILE)
    names = " ".join(
        f"int {codegen.c_identifier(s, 'label')}_{i} = {i};"
        for i, s in enumerate(_HOSTILE)
    )
    source = (
        "#include <cstdio>\n"
        f"const char* kLabels[] = {{{labels}}};\n"
        f"{names}\n"
        'int main() { for (const char* s : kLabels) std::printf("%s|", s); }\n'
    )
    (tmp_path / "labels.cc").write_text(source)
    exe = cpp_compile(
        [tmp_path / "labels.cc"], tmp_path / "labels", "-Wno-unused-variable"
    )
    out = subprocess.run([str(exe)], capture_output=True, check=True).stdout
    assert out.decode("utf-8") == "".join(s + "|" for s in _HOSTILE)
    assert all(
        not ln.lstrip().startswith("#") or ln.startswith("#include <cstdio>")
        for ln in source.splitlines()
    )


def test_generated_sources_hold_no_user_text_in_comments_or_directives(tiny):
    evil = 'x*/ #include "evil.h" //\n#define Y'
    hostile = type(tiny)(tflite=tiny.tflite, report=tiny.report, name=evil)
    files = {
        k: v.decode("utf-8")
        for k, v in hostile.files().items()
        if k.endswith((".h", ".cc"))
    }
    assert set(files) >= {"model_data.h", "model_data.cc", "op_resolver.h"}
    allowed = re.compile(
        r'#(include [<"][\w./]+[>"]|ifndef KMT_\w+|define KMT_\w+|endif  // KMT_\w+)'
    )
    for name, text in files.items():
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                assert allowed.fullmatch(line.strip()), (name, line)
            if "//" in line:
                assert "evil" not in line.split("//", 1)[1], (name, line)
        assert 'evil.h"' not in text  # Quotes are escaped: "#define Y" stays text.
        assert "\n#define Y" not in text


def test_op_resolver_refuses_op_names_from_a_hostile_file():
    with pytest.raises(ValueError, match="no builtin resolver entry"):
        codegen.op_resolver_h(['CUSTOM:x*/ #include "evil.h"'])


# --- Hostile .tflite ---------------------------------------------------------


def _edit(data, change):
    import flatbuffers

    schema = _tflite._schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    change(model, schema)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _set_vector_length(data, table_pos, field, value):
    """Overwrite the length of a table's vector field in place (raw bytes)."""
    vtable = table_pos - struct.unpack_from("<i", data, table_pos)[0]
    offset = struct.unpack_from("<H", data, vtable + field)[0]
    vector = table_pos + offset + struct.unpack_from("<I", data, table_pos + offset)[0]
    out = bytearray(data)
    struct.pack_into("<I", out, vector, value)
    return bytes(out)


def _activations(model, shape):
    sub = model.subgraphs[0]
    for t in sub.tensors:
        if not (
            model.buffers[t.buffer].data is not None
            and len(model.buffers[t.buffer].data)
        ):
            t.shape = list(shape)


def _constant_tensor(model):
    return next(
        t
        for t in model.subgraphs[0].tensors
        if model.buffers[t.buffer].data is not None
        and len(model.buffers[t.buffer].data)
    )


def _while(cond, body):
    def change(model, schema):
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.WHILE
        model.operatorCodes.append(code)
        op = schema.OperatorT()
        op.opcodeIndex = len(model.operatorCodes) - 1
        sub = model.subgraphs[0]
        op.inputs, op.outputs = list(sub.inputs), list(sub.inputs)
        op.builtinOptionsType = schema.BuiltinOptions.WhileOptions
        op.builtinOptions = schema.WhileOptionsT()
        op.builtinOptions.condSubgraphIndex = cond
        op.builtinOptions.bodySubgraphIndex = body
        sub.operators.insert(0, op)

    return change


def _root(data):
    return struct.unpack_from("<I", data, 0)[0]


def _subgraph0(data):
    return _tflite._schema().Model.GetRootAs(data, 0).Subgraphs(0)._tab.Pos


def _input_entry(data, payload=b'{"version": 1}'):
    """`data` with a keras_microtune.input metadata entry holding `payload`."""
    return _tflite.with_metadata(data, input_metadata.NAME, payload)


def _entry_buffer(data):
    model = _tflite._schema().Model.GetRootAs(data, 0)
    return model.Buffers(model.Metadata(model.MetadataLength() - 1).Buffer())._tab.Pos


HOSTILE = {
    "activation claiming 256 GiB": (
        lambda d: _edit(d, lambda m, s: _activations(m, [1, 1 << 19, 1 << 19])),
        "more than the 1,073,741,824 bytes",
    ),
    "shape overflowing int64": (
        lambda d: _edit(d, lambda m, s: _activations(m, [2**31 - 1] * 5)),
        "more than the 1,073,741,824 bytes",
    ),
    "constant larger than its buffer": (
        lambda d: _edit(
            d, lambda m, s: setattr(_constant_tensor(m), "shape", [1 << 20])
        ),
        "buffer holds",
    ),
    "buffer offset past the end": (
        lambda d: _edit(
            d,
            lambda m, s: [
                setattr(m.buffers[1], "offset", 1 << 40),
                setattr(m.buffers[1], "size", 64),
            ],
        ),
        "past the end of the file",
    ),
    "2**31 subgraphs": (
        lambda d: _set_vector_length(d, _root(d), 8, 2**31 - 1),
        "subgraphs",
    ),
    "2**31 tensors": (
        lambda d: _set_vector_length(d, _subgraph0(d), 4, 2**31 - 1),
        "more than the file holds",
    ),
    "WHILE calling its own subgraph": (
        lambda d: _edit(d, _while(0, 0)),
        "cycle",
    ),
    "WHILE calling subgraph 99": (
        lambda d: _edit(d, _while(0, 99)),
        "calls subgraph 99",
    ),
    "input metadata claiming 2 GiB": (
        lambda d: _set_vector_length(
            _input_entry(d), _entry_buffer(_input_entry(d)), 4, 2**31 - 1
        ),
        "more than the 65,536 expected",
    ),
    "input metadata nested 30,000 deep": (
        lambda d: _input_entry(d, b"[" * 30_000 + b"]" * 30_000),
        "not JSON",
    ),
    "input metadata for another input": (
        lambda d: _input_entry(
            d,
            b'{"version":1,"input":0,"dtype":"int8","shape":[1,999],"scale":1,'
            b'"zero_point":0,"raw_min":-128,"raw_max":127}',
        ),
        "changed after conversion",
    ),
    "activations over 1 GiB in total": (
        lambda d: _edit(d, lambda m, s: _activations(m, [1, 600 << 20])),
        "arena limit",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tflite_fails_with_bounded_memory(tiny, case):
    make, match = HOSTILE[case]
    data = make(tiny.tflite)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidModelError, match=match):
            kmt.inspect(data, target="mcu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{case}: {peak:,} bytes allocated"
    assert time.perf_counter() - start < 10


def _flip(data, rng):
    out = bytearray(data)
    for pos in rng.integers(0, len(out), int(rng.integers(1, 5))):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def test_byte_flip_fuzz_succeeds_or_raises_documented_error(tiny):
    rng = np.random.default_rng(1234)
    counts = {"ok": 0, "InvalidModelError": 0}
    cases = [_flip(tiny.tflite, rng) for _ in range(FUZZ_FLIPS)]
    lengths = rng.integers(0, len(tiny.tflite), FUZZ_TRUNCATIONS)
    cases += [tiny.tflite[:n] for n in lengths]
    for data in cases:
        try:
            kmt.inspect(data, target="float32")  # Parse and report, no runtime.
            counts["ok"] += 1
        except InvalidModelError:
            counts["InvalidModelError"] += 1
    assert sum(counts.values()) == FUZZ_FLIPS + FUZZ_TRUNCATIONS
    assert counts["ok"] > 0 and counts["InvalidModelError"] > 0, counts


@settings(
    max_examples=FUZZ_HYPOTHESIS,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_hypothesis_patches_never_escape_the_documented_error(tiny, patches):
    data = bytearray(tiny.tflite)
    for where, value in patches:
        data[int(where * len(data))] = value
    try:
        kmt.inspect(bytes(data), target="float32")
    except InvalidModelError:
        pass


def test_mutants_that_parse_run_isolated_in_tflite_micro(tiny):
    rng = np.random.default_rng(7)
    mutants = []
    while len(mutants) < FUZZ_TFLM:
        data = _flip(tiny.tflite, rng)
        try:
            _tflite.parse(data)
        except InvalidModelError:
            continue
        mutants.append(data)
    outcomes = []
    for data in mutants:
        try:
            kmt.inspect(data, target="mcu")  # TFLite Micro in a child process.
            outcomes.append("ok")
        except InvalidModelError:
            outcomes.append("error")
    assert len(outcomes) == FUZZ_TFLM
