"""The folder scan against every fault real folders contain (RELIABILITY.md)."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_cli.config import ScanConfig
from finetune_cli.data.images import UnusableImage, decode_rgb
from finetune_cli.data.profile import profile_scan
from finetune_cli.data.scan import natural_key, scan_folder
from finetune_cli.errors import FolderError


def test_messy_folder_keeps_valid_and_skips_broken_with_reasons(messy):
    root, expected = messy
    scan = scan_folder(root)
    kept = {r.path for r in scan.images}
    skipped = {s.path: s.reason for s in scan.skipped}
    for rel, outcome in expected.items():
        if outcome == "keep":
            assert rel in kept, f"{rel} should be kept; skipped as {skipped.get(rel)}"
        else:
            assert rel in skipped, f"{rel} should be skipped"
            assert outcome.lower() in skipped[rel].lower(), (rel, skipped[rel])
    # litter is neither kept nor reported
    everything = kept | set(skipped)
    assert not any(".DS_Store" in p or "._" in p or "Thumbs" in p or "ipynb" in p for p in everything)
    assert scan.classes == ("good", "odd ünïcode")
    assert "odd ünïcode/nested/deeper.jpg" in kept  # nested folders merge into their class


@pytest.mark.parametrize(
    "name, check",
    [
        ("cmyk.jpg", lambda a: a.shape == (20, 20, 3) and a[0, 0, 0] > 200 and a[0, 0, 1] < 60),
        ("rgba.png", lambda a: (a == 255).all()),  # fully transparent red -> white background
        ("palette.png", lambda a: (a == 255).all()),  # transparent index 0 -> background
        ("16bit.png", lambda a: (a == 255).all()),  # 65535 scales to 255, not clipped garbage
        ("gray.bmp", lambda a: a.shape == (20, 20, 3) and (a == 128).all()),
        ("anim.gif", lambda a: a[0, 0, 0] > 200 and a[0, 0, 1] < 60),  # first frame, red
    ],
)
def test_awkward_images_become_8bit_rgb(messy, name, check):
    root, _ = messy
    pixels = decode_rgb((root / "odd ünïcode" / name).read_bytes(), max_pixels=10**8)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert check(pixels), pixels[0, 0]


def test_exif_orientation_is_applied(messy):
    root, _ = messy
    pixels = decode_rgb((root / "odd ünïcode" / "rotated.jpg").read_bytes(), max_pixels=10**8)
    assert pixels.shape == (40, 20, 3)  # stored 40x20 landscape, displayed portrait
    top, bottom = pixels[2, 10], pixels[-3, 10]
    assert top[0] > 200 and top[1] < 80  # the red half is on top after rotating 90 CW
    assert bottom.min() > 200


def test_decode_resizes_to_square():
    from tests.conftest import jpeg_bytes

    pixels = decode_rgb(jpeg_bytes((300, 100)), max_pixels=10**8, size=32)
    assert pixels.shape == (32, 32, 3)


def test_pixel_cap_is_configurable(shapes):
    with pytest.raises(FolderError, match="no usable images .*too large: 32x32"):
        scan_folder(shapes, config=ScanConfig(max_pixels=100))


def test_huge_header_is_refused_without_decoding():
    from tests.conftest import _huge_png_header

    with pytest.raises(UnusableImage, match="too large"):
        decode_rgb(_huge_png_header(), max_pixels=64_000_000)


def test_duplicates_within_and_across_classes(shapes):
    same = (shapes / "circle" / "circle_000.jpg").read_bytes()
    (shapes / "circle" / "copy.jpg").write_bytes(same)
    (shapes / "square" / "stolen.jpg").write_bytes(same)
    profile = profile_scan(scan_folder(shapes))
    assert profile.duplicates == [["circle/circle_000.jpg", "circle/copy.jpg", "square/stolen.jpg"]]
    assert any(w.startswith("label conflict") and "circle, square" in w for w in profile.warnings)


def test_within_class_duplicate_is_not_a_conflict(shapes):
    same = (shapes / "circle" / "circle_000.jpg").read_bytes()
    (shapes / "circle" / "copy.jpg").write_bytes(same)
    profile = profile_scan(scan_folder(shapes))
    assert any(w.startswith("duplicate files") for w in profile.warnings)
    assert not any(w.startswith("label conflict") for w in profile.warnings)


def test_class_order_is_natural(tmp_path):
    from finetune_cli.data.synthetic import make_shapes_folder

    root = make_shapes_folder(tmp_path / "d", classes=("circle", "square", "triangle"), per_class=2, size=16)
    for old, new in (("circle", "10"), ("square", "2"), ("triangle", "1")):
        (root / old).rename(root / new)
    assert scan_folder(root).classes == ("1", "2", "10")
    assert sorted(["img10", "img9", "Img1"], key=natural_key) == ["Img1", "img9", "img10"]


def test_imbalance_and_size_category(tmp_path):
    from finetune_cli.data.synthetic import make_shapes_folder

    root = make_shapes_folder(tmp_path / "d", classes=("circle",), per_class=12, size=16)
    make_shapes_folder(root, classes=("square",), per_class=2, size=16, seed=3)
    profile = profile_scan(scan_folder(root))
    assert profile.size_category == "small"
    assert profile.imbalance == 6.0
    assert any("imbalanced" in w for w in profile.warnings)
    large = profile_scan(scan_folder(root), ScanConfig(small_max_per_class=5))
    assert large.size_category == "large"


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"a.jpg": 1, "b.jpg": 1}, "no class subfolders"),
        ({"cat/a.jpg": 1, "cat/b.jpg": 1}, "fewer than two class folders"),
        ({"cat/a.jpg": 1, "cat/b.jpg": 1, "dog/c.jpg": 1}, "'dog' (1)"),
        ({"cat/a.jpg": 1, "cat/b.jpg": 1, "dog/c.jpg": 1, "dog/d.jpg": 1, "loose.jpg": 1}, "beside the class folders"),
        ({"cat/a.jpg": 1, "cat/b.jpg": 1, "dog/c.jpg": 0, "dog/d.jpg": 0}, "'dog' (0)"),
    ],
)
def test_folder_faults_are_refused(tmp_path, layout, message):
    from tests.conftest import jpeg_bytes

    for rel, valid in layout.items():
        path = tmp_path / "d" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(colour=(len(rel) * 7 % 255, 0, 0)) if valid else b"oops")
    with pytest.raises(FolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scan_folder(tmp_path / "d")


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(FolderError, match="is not a folder"):
        scan_folder(tmp_path / "nope")


def test_empty_class_folder_is_ignored_with_warning(shapes):
    (shapes / "empty one").mkdir()
    scan = scan_folder(shapes)
    assert "empty one" not in scan.classes
    assert any("'empty one' is empty" in w for w in scan.warnings)


def test_unlabeled_and_auto(shapes, tmp_path):
    flat = scan_folder(shapes / "circle", labelled=None)
    assert not flat.labelled and all(r.label == "" for r in flat.images) and len(flat.images) == 8
    nested = scan_folder(shapes, labelled=False)
    assert len(nested.images) == 24 and nested.classes == ()
    auto = scan_folder(shapes, labelled=None)
    assert auto.labelled and len(auto.classes) == 3


def test_file_symlinks_are_followed(shapes):
    link = shapes / "circle" / "link.jpg"
    link.symlink_to(shapes / "square" / "square_000.jpg")
    (shapes / "circle" / "dangling.jpg").symlink_to(shapes / "nowhere.jpg")
    scan = scan_folder(shapes)
    assert "circle/link.jpg" in {r.path for r in scan.images}
    assert any(s.path == "circle/dangling.jpg" and "cannot read" in s.reason for s in scan.skipped)
