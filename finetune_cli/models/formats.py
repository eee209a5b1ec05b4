"""Writing a trained Keras model in a deployable format, and running the written file with its own runtime.

Every format starts from Keras 3's own `Model.export` (or the run's own file), never from
`tf.lite.TFLiteConverter.from_keras_model` or tf2onnx's `from_keras`, both broken on Keras 3:

    format      written by                                             run back with
    keras       a copy of the run's model.keras                        keras.saving.load_model (safe mode)
    savedmodel  model.export(format="tf_saved_model")                  tf.saved_model.load(...).serve
    tflite      model.export(format="litert"): a SavedModel, then      ai_edge_litert Interpreter
                TFLiteConverter.from_saved_model, with the               (tf.lite.Interpreter if absent)
                quantisation settings passed through to the converter
    onnx        model.export(format="onnx"): tf2onnx.from_function     onnxruntime (CPU)
                on the traced call; int8: onnxruntime's quant_pre_process
                (graph fusion), then quantize_static

Each file takes one input "image": float32 (B, S, S, 3), raw RGB in [0, 255] (uint8 pixels cast to
float); the preprocessing is inside. Its output is probabilities (B, k) in the class order of
labels.json. Quantisation: tflite none|fp16|dynamic|int8 (int8: full integer kernels, float32 in and
out, ranges from a representative set), onnx none|int8 (int8: static QDQ, per-channel, same set);
keras and savedmodel are float32 only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from finetune_cli.errors import ExportError, SettingsError
from finetune_cli.runtime.keras import import_keras

#: The quantisations each format accepts, the first being the default.
QUANTIZE = {"keras": ("none",), "savedmodel": ("none",), "tflite": ("none", "fp16", "dynamic", "int8"),
            "onnx": ("none", "int8")}
#: Why a format refuses a quantisation others take.
REFUSED = {("onnx", "fp16"): "onnxruntime has no fp16 convolution kernels on CPU",
           ("onnx", "dynamic"): "onnxruntime's dynamic quantisation turns convolutions into ConvInteger, measured "
                                "19x slower than float on CPU (777 vs 40 ms per image); use --quantize int8"}
#: The file (or folder) each format writes.
FILE_NAME = {"keras": "model.keras", "savedmodel": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}
#: How each format is written and run back (recorded in export.json).
ROUTE = {
    "keras": "copy of the run's model.keras; run by keras.saving.load_model",
    "savedmodel": "keras Model.export(format='tf_saved_model'); run by tf.saved_model.load",
    "tflite": "keras Model.export(format='litert') (SavedModel -> TFLiteConverter.from_saved_model); "
              "run by the LiteRT interpreter",
    "onnx": "keras Model.export(format='onnx') (tf2onnx.from_function); int8: onnxruntime quant_pre_process, "
            "quantize_static (QDQ, per channel); run by onnxruntime",
}
EXTRA = "pip install 'finetune-cli[export]'"
INPUT_NAME = "image"


def check_choice(fmt: str, quantize: str) -> None:
    """Refuse an unknown format or a quantisation the format cannot hold.

    Raises:
        SettingsError: saying which combinations exist.
    """
    if fmt not in QUANTIZE:
        raise SettingsError(f"--format must be one of {', '.join(QUANTIZE)}. Received: format={fmt!r}")
    if quantize not in QUANTIZE[fmt]:
        why = f": {REFUSED[fmt, quantize]}" if (fmt, quantize) in REFUSED else ""
        raise SettingsError(f"--format {fmt} takes --quantize {' or '.join(QUANTIZE[fmt])}{why} "
                            f"(tflite: none, fp16, dynamic, int8). Received: quantize={quantize!r}")


def check_runtime(fmt: str) -> None:
    """Refuse early when the packages that write or run `fmt` are missing.

    Raises:
        ExportError: naming the extra to install.
    """
    needed = {"onnx": ("onnx", "onnxruntime", "tf2onnx")}.get(fmt, ())
    missing = [name for name in needed if not _importable(name)]
    if missing:
        raise ExportError(f"--format {fmt} needs {', '.join(missing)}, not installed: {EXTRA}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def write(model, source: Path, fmt: str, quantize: str, folder: Path, size: int, classes: list[str],
          calibration: np.ndarray | None, opset: int | None = None) -> Path:
    """Write `model` as `fmt` into `folder` (FILE_NAME[fmt]); returns the path written.

    Args:
        source: the run's model.keras (copied as is for "keras").
        calibration: float32 (n, S, S, 3) in [0, 255], the representative set of int8; else None.
        classes: stored in the file where the format has room (ONNX metadata_props, TFLite metadata,
            the SavedModel's assets/labels.json; .keras already holds them).

    Raises:
        ExportError: the converter failed (its first line is quoted).
    """
    import tensorflow as tf

    path = folder / FILE_NAME[fmt]
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME)]
    try:
        if fmt == "keras":
            shutil.copyfile(source, path)
        elif fmt == "savedmodel":
            model.export(str(path), format="tf_saved_model", verbose=False, input_signature=spec)
            (path / "assets").mkdir(exist_ok=True)
            (path / "assets" / "labels.json").write_text(json.dumps(classes), "utf-8")
        elif fmt == "tflite":
            model.export(str(path), format="litert", verbose=False, input_signature=spec,
                         **_litert_options(quantize, calibration))
            _tflite_metadata(path, {"classes": classes, "input": _input_note(size)})
        else:
            _write_onnx(model, path, spec, quantize, calibration, opset)
            _onnx_metadata(path, {"classes": json.dumps(classes), "input": _input_note(size)})
    except (ExportError, SettingsError, OSError):
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"converting to {fmt} ({quantize}) failed: {first}") from None
    return path


def split_head(model, spread: float = 8.0, most: int = 4):
    """`model` with its final Dense layer split for 8-bit quantisation; the same function in float.

    A linear head folded from standardised features carries huge weights on near-constant features
    (measured: up to 252 against a mean of 0.5), so one int8 scale for the whole kernel rounds the
    other weights to zero. The kernel's input rows are grouped by their largest |weight| (within a
    factor `spread` per group, at most `most` groups, the smallest rows together), and each group
    becomes its own Dense layer on its own features, quantised with its own scale; their sum goes
    through the head's activation. (Rescaling the features instead is undone: the converter folds a
    constant multiply into the next layer's weights.) Returned unchanged: a model whose last layer is
    not a Dense with a bias, or whose rows are already within `spread`.
    """
    keras = import_keras()
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense) or not head.use_bias:
        return model
    kernel, bias = head.get_weights()
    row_max = np.abs(kernel).max(1)
    group = np.floor(np.log(row_max.max() / np.maximum(row_max, 1e-30)) / np.log(spread))
    group = np.clip(group, 0, most - 1).astype(int)
    if group.max() == 0:
        return model
    parts = []
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        dense = keras.layers.Dense(kernel.shape[1], use_bias=not parts, name=f"{head.name}_part{g}")
        parts.append(dense(keras.ops.take(head.input, rows, axis=1)))
        dense.set_weights([kernel[rows]] + ([bias] if len(parts) == 1 else []))
    outputs = keras.layers.Activation(head.activation)(keras.layers.Add()(parts))
    return keras.Model(model.inputs, outputs, name=model.name)


def _input_note(size: int) -> str:
    return f"{INPUT_NAME}: float32 (batch, {size}, {size}, 3), raw RGB 0-255; output: probabilities"


def _litert_options(quantize: str, calibration: np.ndarray | None) -> dict:
    """TFLiteConverter settings for `quantize` (Keras passes them through to the converter)."""
    import tensorflow as tf

    if quantize == "none":
        return {}
    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "fp16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    elif quantize == "int8":
        options["representative_dataset"] = lambda: ([image[None]] for image in calibration)
        options["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
    return options


def _tflite_metadata(path: Path, entries: dict) -> None:
    """Add `entries` to the .tflite flatbuffer's metadata list, each a named buffer of JSON."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    model.metadata = list(model.metadata or [])
    for name, value in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = f"finetune_{name}", len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(path.stat().st_size + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def tflite_metadata(path: Path) -> dict:
    """The finetune_* metadata entries of a .tflite file, decoded: {"classes": [...], "input": "..."}."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    found = {}
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name.startswith("finetune_"):
            found[name[len("finetune_"):]] = json.loads(bytes(model.buffers[entry.buffer].data).decode("utf-8"))
    return found


def _write_onnx(model, path: Path, spec, quantize: str, calibration: np.ndarray | None, opset: int | None) -> None:
    """Float ONNX by Keras (tf2onnx on the traced call); for int8, onnxruntime's graph optimisation, then
    its static QDQ quantisation (per channel, int8 weights and activations, MinMax ranges)."""
    if quantize == "none":
        model.export(str(path), format="onnx", verbose=False, input_signature=spec, opset_version=opset)
        return
    import logging

    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, fused_path = path.with_name("float.onnx"), path.with_name("fused.onnx")
    model.export(str(float_path), format="onnx", verbose=False, input_signature=spec, opset_version=opset)
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # onnxruntime logs advice on the root logger, every call
    try:
        # fold the per-channel Mul/Add that tf2onnx leaves after each Conv: measured 71.6% -> 90.1% accuracy
        quant_pre_process(str(float_path), str(fused_path), skip_symbolic_shape=True)
        q.quantize_static(fused_path, path, _Reader(calibration), quant_format=q.QuantFormat.QDQ,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8, per_channel=True,
                          calibrate_method=q.CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)
        float_path.unlink(missing_ok=True)
        fused_path.unlink(missing_ok=True)


class _Reader:
    """onnxruntime's CalibrationDataReader over the representative images, one per call."""

    def __init__(self, images: np.ndarray):
        self.images = iter(images)

    def get_next(self):
        image = next(self.images, None)
        return None if image is None else {INPUT_NAME: image[None].astype(np.float32)}


def _onnx_metadata(path: Path, entries: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def runtime(fmt: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The exported file loaded by its own runtime: float32 (B, S, S, 3) in [0, 255] -> probabilities (B, k).

    Raises:
        ExportError: the file does not load.
    """
    if fmt == "keras":
        import tensorflow as tf

        from finetune_cli.models.files import load_model_file

        model = load_model_file(path, ExportError)
        spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
        # compiled once, as `predict` runs it; a list: the functional model's input structure
        call = tf.function(lambda x: model([x], training=False), input_signature=[spec])
        return lambda x: call(x).numpy()
    if fmt == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))  # kept: `serve` reads the variables it owns
        return lambda x: loaded.serve(tf.constant(x)).numpy()
    if fmt == "tflite":
        return _tflite_runtime(path)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x})[0]


def _tflite_runtime(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A LiteRT interpreter that resizes its input to each batch it is given."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow still ships the deprecated interpreter
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(path))
    source, target = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    shape = [None]

    def run(x: np.ndarray) -> np.ndarray:
        if shape[0] != x.shape:
            interpreter.resize_tensor_input(source, list(x.shape))
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(target).copy()

    return run


def onnx_metadata(path: Path) -> dict:
    """The metadata_props of an ONNX file, as a dict of strings."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
