"""Deployment targets: what a converted model must be, and the budgets it must fit.

Example:
    >>> import keras_microtune as kmt
    >>> kmt.targets.get("cortex-m4").ram_bytes
    262144
"""

from __future__ import annotations

import dataclasses

KIB = 1024
MIB = 1024 * 1024

RUNTIMES = ("tflm", "litert")
QUANTIZATIONS = ("int8", "float16", "dynamic", "float32")


@dataclasses.dataclass(frozen=True)
class Target:
    """A named deployment target.

    Args:
        name: str. The name used by `convert(..., target=name)`.
        description: str. One line for humans.
        runtime: str. `"tflm"` (TFLite Micro: int8, batch 1, static shapes, the
            arena is measured) or `"litert"` (LiteRT on a phone or a PC).
        quantization: str. One of `"int8"`, `"float16"`, `"dynamic"`, `"float32"`.
        io_dtype: str. Dtype of the model's inputs and outputs: `"int8"` or
            `"float32"`.
        ram_bytes: int or None. RAM available to the tensor arena; None means no
            budget.
        flash_bytes: int or None. Flash available to the model; None: no budget.
        accelerator: str or None. Vela accelerator configuration (Arm Ethos-U).
        trainable: bool. The model keeps its trainable variables and gets
            `infer`, `train`, `get_weights` and `set_weights` signatures for
            training on the device (LiteRT only; `export/trainable.py`).
    """

    name: str
    description: str
    runtime: str
    quantization: str
    io_dtype: str
    ram_bytes: int | None = None
    flash_bytes: int | None = None
    accelerator: str | None = None
    trainable: bool = False

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(
                f"Received an invalid value for `runtime`, expected one of "
                f"{RUNTIMES}. Received: runtime={self.runtime!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"Received an invalid value for `quantization`, expected one of "
                f"{QUANTIZATIONS}. Received: quantization={self.quantization!r}"
            )
        if self.runtime == "tflm" and self.quantization != "int8":
            raise ValueError("TFLite Micro targets must use int8 quantization.")
        if self.trainable and (
            self.runtime != "litert" or self.quantization not in ("float32", "dynamic")
        ):
            raise ValueError(
                "Trainable targets run in LiteRT with float32 training (frozen "
                "weights float32, or int8 with quantization='dynamic'). "
                f"Received: runtime={self.runtime!r}, "
                f"quantization={self.quantization!r}"
            )

    @property
    def is_mcu(self) -> bool:
        """True for TFLite Micro targets (batch 1, static shapes, stripped)."""
        return self.runtime == "tflm"


def _mcu(name, description, ram, flash, accelerator=None):
    return Target(name, description, "tflm", "int8", "int8", ram, flash, accelerator)


_TARGETS = {
    t.name: t
    for t in (
        _mcu(
            "mcu", "Any microcontroller: TFLite Micro, full int8, no budget", None, None
        ),
        _mcu("cortex-m0plus", "Arm Cortex-M0+ (SAMD21 class)", 32 * KIB, 256 * KIB),
        _mcu("cortex-m4", "Arm Cortex-M4F (nRF52840 class)", 256 * KIB, 1 * MIB),
        _mcu("cortex-m7", "Arm Cortex-M7 (STM32F746 class)", 320 * KIB, 1 * MIB),
        _mcu("esp32-s3", "Espressif ESP32-S3, internal SRAM", 512 * KIB, 8 * MIB),
        _mcu(
            "ethos-u55",
            "Arm Cortex-M55 + Ethos-U55-128 NPU (Corstone-300 class), compiled by Vela",
            2 * MIB,
            4 * MIB,
            accelerator="ethos-u55-128",
        ),
        Target(
            "mobile-int8",
            "LiteRT, int8 kernels, float input/output",
            "litert",
            "int8",
            "float32",
        ),
        Target(
            "mobile-float16", "LiteRT, float16 weights", "litert", "float16", "float32"
        ),
        Target(
            "mobile-dynamic",
            "LiteRT, int8 weights, float activations",
            "litert",
            "dynamic",
            "float32",
        ),
        Target(
            "float32",
            "LiteRT, no quantization (reference)",
            "litert",
            "float32",
            "float32",
        ),
        Target(
            "mobile-trainable",
            "LiteRT, trains its adapters on the device: infer/train/get_weights/"
            "set_weights signatures, builtin ops",
            "litert",
            "float32",
            "float32",
            trainable=True,
        ),
        Target(
            "mobile-trainable-int8",
            "mobile-trainable with the frozen weights stored int8 (a DEQUANTIZE "
            "op restores float32); what trains stays float32",
            "litert",
            "dynamic",
            "float32",
            trainable=True,
        ),
        Target(
            "android",
            "Android phone: LiteRT int8 with float input/output",
            "litert",
            "int8",
            "float32",
            ram_bytes=None,
            flash_bytes=None,
        ),
    )
}


def available() -> list[str]:
    """Names of all targets, in the order they are documented."""
    return list(_TARGETS)


def get(name: str | Target) -> Target:
    """Return the `Target` called `name` (a `Target` is returned unchanged).

    Raises:
        ValueError: when no target has that name; the message lists them all.
    """
    if isinstance(name, Target):
        return name
    if not isinstance(name, str) or name not in _TARGETS:
        raise ValueError(
            f"Received an invalid value for `target`, expected one of "
            f"{available()}. Received: target={name!r}"
        )
    return _TARGETS[name]


def table() -> list[dict]:
    """All targets as rows of plain values (for `keras-microtune targets`)."""
    return [dataclasses.asdict(t) for t in _TARGETS.values()]
