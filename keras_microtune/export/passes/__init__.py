"""The passes `kmt.convert` runs, one module per stage of the data flow.

- `keras_level`: the Keras model (load, strip pruning, preprocessing, trace,
  QAT detection, data to arrays);
- the TFLite conversion itself (`converter.convert_to_tflite`);
- `flatbuffer`: checks and rewrites of the `.tflite` (MCU ops, strip,
  compression, memory plan);
- `measurements`: runs and the report (arena, Vela, parity, budget, verify).

A pass is `pass_(c: pipeline.Conversion) -> dict | None`; adding one is one
function in the module of its stage plus one entry in `converter.PASSES`.
"""
