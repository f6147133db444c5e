"""What `kmt.convert` returns, and writing its files atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from keras_microtune.export import _tflite, codegen, preprocessing
from keras_microtune.export import report as report_lib


class DoesNotFitError(RuntimeError):
    """`strict=True` and the model exceeds the target's RAM or flash."""


class VerificationError(RuntimeError):
    """`strict=True` and TFLite Micro disagrees with LiteRT's reference kernels."""


@dataclasses.dataclass
class ConversionResult:
    """A converted model, its measured figures and its report.

    Attributes:
        tflite: bytes. The model as deployed.
        report: dict. Everything measured (see `report.json`); reproducible:
            `report["passes"]` says what each pass did, not how long it took.
        timings: dict. Wall seconds of each pass in `report["passes"]`, by
            name, in order.
    """

    tflite: bytes
    report: dict
    name: str = "model"
    output_dir: str | None = None  # Real path of the last `save`.
    timings: dict = dataclasses.field(default_factory=dict, compare=False)
    # `(tflite, its _tflite.ModelInfo)`: parsed once, again only if `tflite` changes.
    _parsed: tuple = dataclasses.field(
        default=(None, None), init=False, repr=False, compare=False
    )

    def _info(self) -> _tflite.ModelInfo:
        """The parsed `tflite` (ops, tensors), cached while `tflite` is unchanged."""
        data, info = self._parsed
        if data is not self.tflite:
            info = _tflite.parse(self.tflite)
            self._parsed = (self.tflite, info)
        return info

    @property
    def size_bytes(self) -> int:
        return len(self.tflite)

    @property
    def arena_bytes(self) -> int | None:
        """Tensor arena measured in TFLite Micro (None for LiteRT targets)."""
        return self.report["memory"].get("arena_bytes")

    @property
    def ops(self) -> list[str]:
        return list(self.report["ops"])

    @property
    def parity(self) -> dict | None:
        return self.report["parity"]

    @property
    def fits(self) -> bool:
        return bool(self.report["budget"]["fits"])

    def quantize_input(self, x):
        """Raw inputs -> the integers the device feeds (see `report["input"]`)."""
        return preprocessing.quantize_input(x, self.report["input"])

    def files(self, history=None, evaluations=None, project=False) -> dict[str, bytes]:
        """The artifacts `save` writes, by file name (see `save`)."""
        from keras_microtune.export import artifacts

        out = {"model.tflite": self.tflite}
        if self.report["target"]["runtime"] == "tflm":
            generated = codegen.files(
                self.tflite,
                self.name,
                self.ops,
                self.arena_bytes,
                input_report=self.report.get("input"),
            )
            out.update({k: v.encode() for k, v in generated.items()})
        extra = artifacts.extra_files(self, history, evaluations, project)
        out.update(extra)
        out["report.json"] = json.dumps(self.report, indent=2).encode()
        plot_names = [name for name in extra if name.endswith(".png")]
        out["report.md"] = (
            report_lib.markdown(self.report) + artifacts.plots_section(plot_names)
        ).encode()
        return out

    def save(
        self,
        directory: str | os.PathLike,
        overwrite: bool = False,
        history: dict | None = None,
        evaluations: dict | None = None,
        project: bool = False,
    ) -> str:
        """Write the artifacts into `directory` atomically; return its real path.

        Always: `model.tflite`, `report.json`, `report.md`. TFLite Micro
        targets add `model_data.cc`/`.h`, `op_resolver.h` and `test_data.h`
        (a test input and TFLite Micro's output for it); `project=True` adds
        the application template (`main.cc`, `Makefile`, `README.md`). LiteRT
        targets add `mobile.md`. With matplotlib installed, PNG plots:
        `memory.png`, `flash.png`, `layer_errors.png` (int8 targets), and
        `training.png` / `confusion.png` when `history` (a Keras History
        dict) / `evaluations` (title -> `kmt.evaluate` result) are given.

        Files go to a temporary folder beside `directory` that is renamed into
        place at the end: on any failure the destination is left as it was.

        A symbolic link is resolved: the files go to the folder it points to,
        whose real path is returned and kept in `result.output_dir`.

        Raises:
            FileExistsError: `directory` exists, is not empty, and not `overwrite`.
            PermissionError: the location is not writable (nothing is written).
        """
        files = self.files(history, evaluations, project)
        self.output_dir = save_files(files, directory, overwrite)
        return self.output_dir


def check_output_dir(directory, overwrite: bool = False) -> str:
    """The real path `directory` resolves to; raise if saving there cannot work.

    Called by `convert` before converting, so a bad `output_dir` fails fast.
    """
    dest = os.path.realpath(os.fspath(directory))
    if os.path.exists(dest):
        if not os.path.isdir(dest):
            raise FileExistsError(
                f"Output path {dest!r} exists and is not a folder; choose a folder "
                "path for the output."
            )
        if os.listdir(dest) and not overwrite:
            raise FileExistsError(
                f"Output folder {dest!r} is not empty; pass overwrite=True "
                "(CLI: --overwrite) to replace it, or choose an empty folder."
            )
    parent = os.path.dirname(dest)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PermissionError(
            f"Cannot write the output folder {dest!r}: {parent!r} is not a writable "
            "folder. Choose an output folder you can write to."
        )
    return dest


def save_files(files: dict[str, bytes], directory, overwrite: bool = False) -> str:
    """Write `files` (name -> bytes) into `directory` atomically; return its
    real path. The destination is untouched on any failure or interrupt."""
    bad = [n for n in files if os.path.basename(n) != n or n in ("", ".", "..")]
    if bad:
        raise ValueError(f"Refusing to write outside the output folder: {bad}")
    dest = check_output_dir(directory, overwrite)
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".kmt_tmp_", dir=parent)
    except OSError as e:
        raise OSError(
            e.errno,
            f"Cannot write the output folder {dest!r}: {e.strerror} in {parent!r}. "
            "Choose an output folder you can write to.",
        ) from None
    backup = None
    try:
        for name, content in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content)
        if os.path.exists(dest):
            backup = tempfile.mkdtemp(prefix=".kmt_old_", dir=parent)
            os.rmdir(backup)
            os.rename(dest, backup)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup and not os.path.exists(dest):
            os.rename(backup, dest)
        raise
    if backup:
        shutil.rmtree(backup, ignore_errors=True)
    return dest
