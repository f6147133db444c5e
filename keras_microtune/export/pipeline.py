"""One conversion's state, and running passes over it.

A pass is a function `pass_(c: Conversion) -> dict | None`. It reads and
updates the state `c` and returns a short dict of what it did, or None when it
does not apply to this conversion (it is then left out of the report). `run`
records `{"name", ...what it did}` in `c.passes`, adding `bytes_before` /
`bytes_after` when the pass replaced the flatbuffer, and each pass's wall
seconds in `c.timings`: kept out of the report, which stays reproducible
(the same model, data and seed give the same report and files).
`kmt.convert`'s pass list is `converter.PASSES`; the passes live in
`keras_microtune.export.passes`, one module per stage of the data flow.
"""

from __future__ import annotations

import dataclasses
import time

from keras_microtune.export import _tflite


@dataclasses.dataclass
class Conversion:
    """Everything a conversion carries from pass to pass.

    Attributes:
        model: what the caller passed (a model or a path); `source` is the
            loaded Keras (or tf_keras, SavedModel) model the passes rewrite.
        target: the `Target`.
        options: `convert`'s keyword arguments, checked.
        prep: the `preprocessing.Plan` (None: no leading preprocessing).
        lowerings: `lowering.Lowering`s swapped in while tracing (TFLite
            Micro targets: ops it cannot run in int8, rewritten).
        recurrent: the `lower_recurrent` rows (None: no recurrent layer);
            `trace_constants`: trace with weights as constants (fused LSTM).
        stream: the `streaming.StepModel` (`convert(streaming=True)`).
        rep, val, y_val: calibration inputs, validation inputs and labels as
            lists of arrays (None when not given).
        uncompressed: `(tflite, info)` before weight compression, which LiteRT
            cannot load (None when not compressed).
        training: the trainable target's plan (`trainable.plan`; None
            for other targets).
        arena, memory, vela: TFLite Micro arena, memory-plan report entries,
            Vela figures (None / {} until measured).
        precision: `convert(precision=...)` resolved: `{layer: dtype}` of the
            layers not in int8, or "auto"; `mixed`: the `precision.Mixed`
            state (calibration, all-int8 baseline) when precision is asked.
        report: report entries written by the passes; `passes`: their records;
            `timings`: pass name -> wall seconds.
    """

    model: object
    target: object
    options: dict = dataclasses.field(default_factory=dict)
    source: object = None
    name: str = "model"
    pruning_stripped: bool = False
    specs: list | None = None
    prep: object = None
    lowerings: list = dataclasses.field(default_factory=list)
    recurrent: list | None = None
    stream: object = None
    trace_constants: bool = False
    concrete: object = None
    qat: bool = False
    rep: list | None = None
    val: list | None = None
    y_val: object = None
    uncompressed: tuple | None = None
    training: dict | None = None
    arena: dict | None = None
    memory: dict = dataclasses.field(default_factory=dict)
    vela: dict | None = None
    precision: object = None
    mixed: object = None
    report: dict = dataclasses.field(default_factory=dict)
    passes: list = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)
    _tflite: bytes | None = dataclasses.field(default=None, repr=False)
    _info: _tflite.ModelInfo | None = dataclasses.field(default=None, repr=False)

    @property
    def tflite(self) -> bytes | None:
        """The current flatbuffer."""
        return self._tflite

    @tflite.setter
    def tflite(self, data: bytes) -> None:
        self.set_tflite(data)

    def set_tflite(self, data: bytes, info: _tflite.ModelInfo | None = None) -> None:
        """Replace the flatbuffer; `info` is `data` parsed, when already known."""
        if data is not self._tflite:
            self._tflite, self._info = data, info

    @property
    def info(self) -> _tflite.ModelInfo:
        """The current flatbuffer parsed, once per distinct flatbuffer."""
        if self._info is None:
            self._info = _tflite.parse(self._tflite)
        return self._info

    @property
    def litert_model(self) -> tuple[bytes, _tflite.ModelInfo]:
        """`(tflite, info)` of the model LiteRT loads (the uncompressed one)."""
        return self.uncompressed or (self.tflite, self.info)

    @property
    def shapes(self) -> list[tuple]:
        """Input shapes without the batch axis."""
        return [shape for shape, _ in self.specs]

    @property
    def converted_model(self):
        """The Keras model given to the TFLite converter."""
        return self.prep.model if self.prep else self.source

    @property
    def float_model(self):
        """The float model parity compares against (inputs as `transform` gives)."""
        return self.prep.model if self.prep and self.prep.folded else self.source

    def transform(self, xs):
        """Raw inputs -> what `converted_model` takes (see `preprocessing.Plan`)."""
        return self.prep.transform(xs) if self.prep else xs


def run(c: Conversion, passes) -> Conversion:
    """Run `passes` in order over `c`, recording each in `c.passes` and
    its wall time in `c.timings`."""
    for pass_ in passes:
        before, start = c.tflite, time.perf_counter()
        did = pass_(c)
        seconds = time.perf_counter() - start
        if did is None:
            continue
        record = {"name": pass_.__name__, **did}
        if c.tflite is not before:
            if before is not None:
                record["bytes_before"] = len(before)
            record["bytes_after"] = len(c.tflite)
        c.passes.append(record)
        c.timings[pass_.__name__] = seconds
    return c
