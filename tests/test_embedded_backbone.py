"""The embedded default backbone, EfficientNet-Lite0, and its torch-free weight reader.

Tested here:
- `models.torch_legacy.read_state_dict` on legacy `.pth` files written by a
  helper in this file (fake `torch` modules make the standard `pickle` emit
  the same opcodes as `torch.save`): float32 tensors of several shapes,
  a transposed (non-contiguous) view, an offset into a shared storage, an
  int64 scalar, float16 and bfloat16 tensors, all exact;
- its refusals: globals outside the allowlist (`builtins.open`,
  `os.system`, `builtins.eval`) in every pickle of the file raise
  `UnsafeFileError` without running (each payload is shown to be live with
  plain `pickle` first); bad magic, truncation, the zip format, an empty
  file -> `BackboneError`; tensor views reaching outside their storage
  (past the end, huge stride, negative offset or size) -> `BackboneError`;
- `efficientnet_lite`: every packaged weight lands in a layer, missing or
  misshapen weights are refused, `ensure_converted` converts once into a
  fresh folder (both `.keras` files) and leaves the file alone afterwards,
  two processes converting at once leave two whole files and no litter,
  and a reader polling meanwhile never sees a partial file;
- `backbones.build` of `efficientnet_lite0` at 64 px: feature map and
  ImageNet softmax shapes, the packaged weights in place, a damaged
  converted file converted again;
- equivalence with the shared reference `.keras` (skipped when absent) on
  real photos from `sample_data/signs`;
- `efficientnet_lite0` is the default: first in the registry, in
  `config.DEFAULT_BASE`, first in `finetune bases --json`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from finetune_cli import config
from finetune_cli.errors import BackboneError, UnsafeFileError, WeightsUnavailableError
from finetune_cli.models import backbones, efficientnet_lite, registry
from finetune_cli.models.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, read_state_dict
from finetune_cli.runtime.keras import import_keras

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "backbones"
REFERENCE = SHARED / "efficientnet_lite0_imagenet.keras"
SIGNS = ROOT / "sample_data" / "signs"

# ---------------------------------------------------------------------------
# A writer for PyTorch's legacy (non-zip) format, without torch.

#: numpy dtype -> torch storage class name.
STORAGE_NAMES = {"<f4": "FloatStorage", "<i8": "LongStorage", "<f2": "HalfStorage", "<u2": "BFloat16Storage"}


@dataclass(eq=False)
class Storage:
    """A flat torch storage: `key` as torch names it, `data` its elements (uint16 words for bfloat16)."""

    key: str
    data: np.ndarray
    kind: str = ""

    def name(self) -> str:
        return self.kind or STORAGE_NAMES[self.data.dtype.str]


@dataclass(eq=False)
class Tensor:
    """A view onto a storage; pickles as `torch._utils._rebuild_tensor_v2(...)` like a real tensor."""

    storage: Storage
    offset: int
    size: tuple
    stride: tuple

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2  # the fake, installed by `fake_torch`
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, OrderedDict())


def contiguous(key: str, array: np.ndarray) -> Tensor:
    """A tensor owning its own storage, C order."""
    array = np.array(array, order="C")  # (ascontiguousarray would make a scalar 1-d)
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(key, array.reshape(-1)), 0, array.shape, strides)


class _LegacyPickler(pickle.Pickler):
    """Turns every `Storage` into torch's persistent id and remembers the storages in order."""

    def __init__(self, handle):
        super().__init__(handle, protocol=2)
        self.storages: dict[str, Storage] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages.setdefault(obj.key, obj)
        storage_type = getattr(sys.modules["torch"], obj.name())
        return ("storage", storage_type, obj.key, "cpu", obj.data.size, None)


SYS_INFO = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy_parts(state) -> list[bytes]:
    """The six parts of a legacy `.pth`: magic, version, sys info, main pickle, key list, storage data."""
    head = [pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO)]
    buffer = io.BytesIO()
    pickler = _LegacyPickler(buffer)
    pickler.dump(state)
    keys = pickle.dumps(list(pickler.storages), protocol=2)
    data = b"".join(struct.pack("<q", s.data.size) + s.data.astype(s.data.dtype.newbyteorder("<")).tobytes()
                    for s in pickler.storages.values())
    return [*head, buffer.getvalue(), keys, data]


def write_legacy(path: Path, state=None, **replace: bytes) -> Path:
    """Write a legacy `.pth`; `replace` swaps named parts (magic, version, info, main, keys, data)."""
    names = ("magic", "version", "info", "main", "keys", "data")
    parts = dict(zip(names, legacy_parts(OrderedDict() if state is None else state)))
    parts.update(replace)
    path.write_bytes(b"".join(parts[n] for n in names))
    return path


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules `torch` and `torch._utils` with just what a state dict pickle names."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch", "__qualname__": name}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("the fake torch only pickles")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2, torch._utils = _rebuild_tensor_v2, utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def call_pickle(module: str, name: str, *args: str) -> bytes:
    """A protocol-2 pickle that calls `module.name(*args)` when loaded by plain `pickle`."""
    out = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"("
    for arg in args:
        raw = arg.encode()
        out += b"X" + struct.pack("<I", len(raw)) + raw
    return out + b"tR."


def in_state_dict(call: bytes) -> bytes:
    """`call` (a pickle, STOP stripped) as the value of one entry of an OrderedDict state dict."""
    key = b"_fc.weight"
    return (b"\x80\x02ccollections\nOrderedDict\n)R(X" + struct.pack("<I", len(key)) + key
            + call[2:-1] + b"u.")


# ---------------------------------------------------------------------------
# Reading legacy files


def sample_state() -> tuple[OrderedDict, dict[str, np.ndarray]]:
    """A state dict of tricky tensors and the arrays it must read back as."""
    shared = Storage("140001", (np.arange(24, dtype="<f4") * 0.5 - 3.25))
    specials = np.array([-0.0, np.inf, -np.inf, np.nan, 1e-45, np.finfo("f4").max, 3.1415927], "<f4")
    half = np.array([[0.5, -1.25], [65504.0, 6e-8]], "<f2")
    bf16 = np.array([1.5, -2.0, 0.15625, 2.0**100], "<f4")  # exact in bfloat16
    state = OrderedDict([
        ("block.weight", Tensor(shared, 0, (2, 3, 4), (12, 4, 1))),
        ("block.weight_t", Tensor(shared, 0, (4, 6), (1, 4))),  # transposed: same storage, swapped stride
        ("block.tail", Tensor(shared, 20, (2, 2), (1, 2))),  # offset into the shared storage, Fortran order
        ("head.bias", contiguous("140002", specials)),
        ("bn.num_batches_tracked", contiguous("140003", np.array(2**40 + 3, "<i8"))),
        ("half.weight", contiguous("140004", half)),
        ("bf16.weight", Tensor(Storage("140005", (bf16.view("<u4") >> 16).astype("<u2"), "BFloat16Storage"),
                               0, (4,), (1,))),
    ])
    flat = shared.data
    expected = {
        "block.weight": flat.reshape(2, 3, 4),
        "block.weight_t": flat.reshape(6, 4).T,
        "block.tail": flat[20:24].reshape(2, 2, order="F"),
        "head.bias": specials,
        "bn.num_batches_tracked": np.array(2**40 + 3, "int64"),
        "half.weight": half,
        "bf16.weight": bf16,
    }
    return state, expected


def test_round_trip_is_exact(tmp_path, fake_torch):
    state, expected = sample_state()
    got = read_state_dict(write_legacy(tmp_path / "w.pth", state))
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name, strict=True)


def test_written_file_uses_torch_opcodes(tmp_path, fake_torch):
    """The helper writes what torch writes: the storage type and rebuilder as GLOBALs, storages as BINPERSID."""
    state, _ = sample_state()
    main = legacy_parts(state)[3]
    for opcode in (b"ctorch\nFloatStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n",
                   b"ctorch\nLongStorage\n", b"Q"):
        assert opcode in main, opcode


def test_packaged_weights_read(tmp_path):
    state = read_state_dict(efficientnet_lite.source_file())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values())


# ---------------------------------------------------------------------------
# Refusals


def _payloads(target: Path) -> dict[str, bytes]:
    """Pickles that each create `target` when loaded by plain pickle."""
    return {
        "open": call_pickle("builtins", "open", str(target), "w"),
        "system": call_pickle("os", "system", f"touch '{target}'"),
        "eval": call_pickle("builtins", "eval", f"open({str(target)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("kind", ["open", "system", "eval"])
def test_payload_is_live_under_plain_pickle(tmp_path, kind):
    """Control for the refusal tests: the payload does run when nothing guards it."""
    target = tmp_path / "pwned"
    result = pickle.loads(_payloads(target)[kind])
    if hasattr(result, "close"):
        result.close()
    assert target.exists()


@pytest.mark.parametrize("part", ["magic", "version", "info", "main", "main-nested", "keys"])
@pytest.mark.parametrize("kind", ["open", "system", "eval"])
def test_unsafe_global_refused_without_running(tmp_path, fake_torch, part, kind):
    target = tmp_path / "pwned"
    payload = _payloads(target)[kind]
    state, _ = sample_state()
    if part == "main-nested":
        path = write_legacy(tmp_path / "evil.pth", state, main=in_state_dict(payload))
    else:
        path = write_legacy(tmp_path / "evil.pth", state, **{part: payload})
    with pytest.raises(UnsafeFileError, match="refused"):
        read_state_dict(path)
    assert not target.exists()


def test_allowlisted_global_outside_main_pickle_refused(tmp_path, fake_torch):
    """Only the main pickle may name even the allowed globals; the header is plain values."""
    info = b"\x80\x02ccollections\nOrderedDict\n)R."
    with pytest.raises(UnsafeFileError, match="collections.OrderedDict"):
        read_state_dict(write_legacy(tmp_path / "w.pth", info=info))


def test_persistent_id_that_is_not_a_storage_refused(tmp_path, fake_torch):
    main = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00a" + b"X\x04\x00\x00\x00evilQu."
    with pytest.raises(UnsafeFileError, match="not a tensor storage"):
        read_state_dict(write_legacy(tmp_path / "w.pth", main=main))


def test_tensor_without_storage_refused(tmp_path, fake_torch):
    """`_rebuild_tensor_v2` is allowed, but only over a storage."""
    main = (b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00a"
            b"ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)))\x89t" b"Ru.")
    with pytest.raises(UnsafeFileError, match="does not refer to a storage"):
        read_state_dict(write_legacy(tmp_path / "w.pth", main=main))


def _damaged(tmp_path: Path, how: str) -> Path:
    state, _ = sample_state()
    path = write_legacy(tmp_path / "w.pth", state)
    whole = path.read_bytes()
    if how == "magic":
        write_legacy(path, state, magic=pickle.dumps(MAGIC_NUMBER + 1, protocol=2))
    elif how == "version":
        write_legacy(path, state, version=pickle.dumps(1000, protocol=2))
    elif how.startswith("cut"):
        path.write_bytes(whole[: -int(how[3:])])
    elif how == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("archive/data.pkl", legacy_parts(state)[3])
        path.write_bytes(buffer.getvalue())
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    elif how == "unlisted-storage":
        write_legacy(path, state, keys=pickle.dumps(["nope"], protocol=2))
    return path


@pytest.mark.parametrize("how", ["magic", "version", "cut1", "cut40", "zip", "empty", "text", "unlisted-storage"])
def test_damaged_file_is_backbone_error(tmp_path, fake_torch, how):
    path = _damaged(tmp_path, how)
    with pytest.raises(BackboneError) as caught:
        read_state_dict(path)
    assert not isinstance(caught.value, UnsafeFileError)
    assert path.name in str(caught.value)


def test_truncated_main_pickle_is_backbone_error(tmp_path, fake_torch):
    state, _ = sample_state()
    parts = legacy_parts(state)
    path = tmp_path / "w.pth"
    path.write_bytes(b"".join(parts[:3]) + parts[3][: len(parts[3]) // 2])
    with pytest.raises(BackboneError, match="damaged"):
        read_state_dict(path)


_READ_IN_CHILD = """
import sys
from finetune_cli.errors import BackboneError
from finetune_cli.models.torch_legacy import read_state_dict
try:
    read_state_dict(sys.argv[1])
except BackboneError:
    print("refused")
else:
    print("read")
"""

@pytest.mark.parametrize("offset, size, stride", [
    pytest.param(0, (1 << 20,), (1,), id="past-the-end"),
    pytest.param(0, (2,), (1 << 40,), id="huge-stride"),
    pytest.param(9, (), (), id="scalar-offset"),
    pytest.param(-1, (2,), (1,), id="negative-offset"),
    pytest.param(0, (-2,), (1,), id="negative-size"),
    pytest.param(2, (2,), (1,), id="in-bounds"),  # the control: a view that fits is read
])
def test_view_outside_its_storage_is_refused(tmp_path, fake_torch, offset, size, stride):
    """A crafted view must be a BackboneError, not a read of foreign memory; run in a child in case it crashes."""
    tensor = Tensor(Storage("1", np.arange(4, dtype="<f4")), offset, size, stride)
    path = write_legacy(tmp_path / "w.pth", OrderedDict(a=tensor))
    child = subprocess.run([sys.executable, "-c", _READ_IN_CHILD, str(path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    fits = offset >= 0 and all(n >= 0 for n in size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) < 4
    assert (child.returncode, child.stdout.strip()) == (0, "read" if fits else "refused"), child.stderr[-500:]


# ---------------------------------------------------------------------------
# The architecture and the weight transfer (no conversion file)


def _weight_keys(state) -> set[str]:
    return {k for k in state if not k.endswith("num_batches_tracked")}


def test_every_packaged_weight_has_a_layer():
    keras = import_keras()
    model = efficientnet_lite.build(keras, 64, include_top=True)
    state = read_state_dict(efficientnet_lite.source_file())
    used = set()
    for prefix in efficientnet_lite.torch_names(model).values():
        used |= {k for k in state if k.startswith(prefix + ".")} & _weight_keys(state)
    assert used == _weight_keys(state)
    assert sum(int(np.prod(w.shape)) for w in model.weights) == sum(state[k].size for k in used)


def test_load_torch_weights_transposes():
    keras = import_keras()
    model = efficientnet_lite.build(keras, 64, include_top=True)
    state = read_state_dict(efficientnet_lite.source_file())
    efficientnet_lite.load_torch_weights(model, state)
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("block3_dwconv").get_weights()[0],
                                  state["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    kernel, bias = model.get_layer("predictions").get_weights()
    np.testing.assert_array_equal(kernel, state["_fc.weight"].T)
    np.testing.assert_array_equal(bias, state["_fc.bias"])


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_load_torch_weights_refuses_unfit_state(fault):
    keras = import_keras()
    model = efficientnet_lite.build(keras, 64, include_top=False)
    state = read_state_dict(efficientnet_lite.source_file())
    key = "_blocks.7._project_conv.weight"
    if fault == "missing":
        del state[key]
    else:
        state[key] = state[key][:-1]
    with pytest.raises(WeightsUnavailableError, match=key if fault == "missing" else "does not fit block7_project"):
        efficientnet_lite.load_torch_weights(model, state)


# ---------------------------------------------------------------------------
# Conversion


def _digest() -> str:
    return backbones.file_digest(efficientnet_lite.source_file())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One fresh conversion for this module: (folder, what the first `ensure_converted` returned)."""
    folder = tmp_path_factory.mktemp("lite0-converted")
    return folder, efficientnet_lite.ensure_converted(folder, efficientnet_lite.source_file(), _digest())


@pytest.fixture
def use_converted(converted, monkeypatch):
    """`backbones.build` reads from the module's converted folder."""
    monkeypatch.setenv("FINETUNE_MODELS_DIR", str(converted[0]))
    return converted


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_first_conversion_writes_both_files(converted):
    folder, first = converted
    top, notop = efficientnet_lite.converted_paths(folder, _digest())
    assert first.converted and first.seconds > 0 and first.path == top
    assert _listing(folder) == sorted([top.name, notop.name])
    assert notop.name.endswith("_notop.keras") and zipfile.is_zipfile(top) and zipfile.is_zipfile(notop)


def test_second_call_converts_nothing(converted):
    folder, first = converted
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    again = efficientnet_lite.ensure_converted(folder, efficientnet_lite.source_file(), _digest())
    assert (again.path, again.converted, again.seconds) == (first.path, False, 0.0)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before


def test_notop_file_is_the_trunk(converted):
    keras = import_keras()
    _, notop = efficientnet_lite.converted_paths(converted[0], _digest())
    trunk = keras.saving.load_model(notop)
    assert trunk.output_shape == (None, None, None, 1280)
    state = read_state_dict(efficientnet_lite.source_file())
    np.testing.assert_array_equal(trunk.get_layer("head_conv").get_weights()[0],
                                  state["_conv_head.weight"].transpose(2, 3, 1, 0))


def _pixels(n=2, size=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def test_build_at_64_gives_maps_and_imagenet_softmax(use_converted):
    folder, _ = use_converted
    before = _listing(folder), [p.stat().st_mtime_ns for p in sorted(folder.iterdir())]
    backbone = backbones.build(backbones.resolve("efficientnet_lite0", image_size=64))
    assert backbone.model.output_shape == (None, 2, 2, 1280)
    assert backbone.classifier.output_shape == (None, 1000)
    probs = np.asarray(backbone.classifier(_pixels(), training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    state = read_state_dict(efficientnet_lite.source_file())
    np.testing.assert_array_equal(backbone.model.get_layer("stem_bn").get_weights()[3], state["_bn0.running_var"])
    assert (_listing(folder), [p.stat().st_mtime_ns for p in sorted(folder.iterdir())]) == before


def test_damaged_converted_file_is_converted_again(converted, tmp_path, monkeypatch):
    top, notop = efficientnet_lite.converted_paths(tmp_path, _digest())
    top.write_bytes(b"\x00garbage, not a zip" * 100)
    notop.write_bytes((converted[0] / notop.name).read_bytes())
    monkeypatch.setenv("FINETUNE_MODELS_DIR", str(tmp_path))
    backbone = backbones.build(backbones.resolve("efficientnet_lite0", image_size=64))
    assert zipfile.is_zipfile(top)
    state = read_state_dict(efficientnet_lite.source_file())
    np.testing.assert_array_equal(backbone.classifier.get_layer("predictions").get_weights()[0], state["_fc.weight"].T)
    assert _listing(tmp_path) == sorted([top.name, notop.name])


_CONVERTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from finetune_cli.models import backbones, efficientnet_lite
    from finetune_cli.runtime.keras import import_keras
    import_keras()
    folder, ready, go = map(Path, sys.argv[1:4])
    source = efficientnet_lite.source_file()
    digest = backbones.file_digest(source)
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    print(efficientnet_lite.ensure_converted(folder, source, digest).converted)
""")


def _run_converters(folder: Path, work: Path, n: int = 2) -> tuple[list[int], list[str], list[bool]]:
    """Start `n` converters into `folder`, release them at once; (exit codes, outputs, what a reader saw)."""
    env, go = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), work / "go"
    top, _ = efficientnet_lite.converted_paths(folder, _digest())
    logs = [open(work / f"log{i}", "w+") for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERTER, str(folder), str(work / f"ready{i}"), str(go)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    seen = []  # whole-file checks by a reader polling while they write
    try:
        deadline = time.monotonic() + 240
        while not all((work / f"ready{i}").exists() for i in range(n)) and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.02)
        go.touch()  # all start converting at the same moment
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if top.exists():
                seen.append(zipfile.is_zipfile(top))
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return [p.returncode for p in procs], outputs, seen


def test_concurrent_first_use_leaves_two_whole_files(converted, tmp_path):
    folder = tmp_path / "models"
    codes, outputs, seen = _run_converters(folder, tmp_path)
    assert codes == [0, 0], outputs
    assert [out.split()[-1] for out in outputs] == ["True", "True"], outputs  # both really converted
    assert all(seen), "a reader saw a partly written converted file"
    top, notop = efficientnet_lite.converted_paths(folder, _digest())
    assert _listing(folder) == sorted([top.name, notop.name])
    assert not [n for n in _listing(folder) if n.startswith(".") or n.endswith("~")]
    _assert_same_weights(import_keras().saving.load_model(top), converted[1].path)


def _assert_same_weights(model, reference_path: Path) -> None:
    reference = import_keras().saving.load_model(reference_path)
    mine, theirs = model.get_weights(), reference.get_weights()
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Equivalence with the shared reference file


def _photos(size=224, n=6) -> np.ndarray:
    from PIL import Image

    paths = sorted(SIGNS.glob("*/*.JPG"))
    paths = paths[:: max(1, len(paths) // n)][:n]  # spread over the classes
    assert len(paths) == n
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), "float32")
                     for p in paths])


def test_matches_shared_reference_on_real_photos(use_converted):
    if not REFERENCE.is_file():
        pytest.skip(f"no shared reference backbone at {REFERENCE} (it is optional; nothing to compare with)")
    keras = import_keras()
    reference = keras.saving.load_model(REFERENCE)
    ours = backbones.build(backbones.resolve("efficientnet_lite0", image_size=224)).classifier
    photos = _photos()
    want = np.asarray(reference.predict(photos, verbose=0))
    got = np.asarray(ours.predict(photos, verbose=0))
    assert got.shape == want.shape == (len(photos), 1000)
    assert np.abs(got - want).max() < 1e-5
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


# ---------------------------------------------------------------------------
# The default


def test_lite0_is_the_default():
    assert registry.names()[0] == "efficientnet_lite0"
    assert config.DEFAULT_BASE == "efficientnet_lite0"
    spec = registry.get("efficientnet_lite0")
    assert spec.embedded and spec.feature_dim == 1280


def test_cli_bases_lists_lite0_first():
    from click.testing import CliRunner

    from finetune_cli.cli import cli

    result = CliRunner().invoke(cli, ["bases", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows[0]["name"] == "efficientnet_lite0" and rows[0]["feature_dim"] == 1280
    assert [r["name"] for r in rows] == registry.names()


def test_similarity_reads_imagenet_confidence_from_cached_features(use_converted):
    """`pooled_head` finds the pool + softmax on the trunk's output, and softmax(features @ W + b) equals the
    classifier's own output, so the probe needs no second forward pass."""
    from finetune_cli.train.session import pooled_head

    backbone = backbones.build(backbones.resolve("efficientnet_lite0", image_size=64))
    kernel, bias = pooled_head(backbone.classifier, backbone.model)
    x = _pixels(n=3)
    pooled = backbone.model(x).numpy().mean(axis=(1, 2))
    logits = pooled @ kernel + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, backbone.classifier(x).numpy(), atol=1e-5)
    keras = import_keras()
    inputs = keras.Input((64, 64, 3))
    maps = keras.layers.Conv2D(4, 3)(inputs)
    no_pool = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(maps)))
    assert pooled_head(no_pool, keras.Model(inputs, maps)) is None
