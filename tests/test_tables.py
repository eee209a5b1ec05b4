"""Label tables (CSV, TSV, Parquet) read wherever a labelled folder is: the same run, the scan's guarantees."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import TABLE, TableConfig
from finetune_cli.data import tables
from finetune_cli.data.scan import scan_folder
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import FolderError


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def listing(folder) -> pd.DataFrame:
    """path,label rows for every image of a class-per-subfolder `folder` (paths relative to it)."""
    scan = scan_folder(folder)
    return pd.DataFrame({"path": [r.path for r in scan.images], "label": [r.label for r in scan.images]})


def test_a_table_and_the_folder_it_lists_give_the_same_run(tmp_path, tiny_base):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=12, size=32, seed=1)
    listing(shapes).to_csv(shapes / "labels.csv", index=False)
    listing(shapes).to_parquet(shapes / "labels.parquet")
    runs = {name: api.train(src, str(tiny_base), out=tmp_path / name, image_size=32, similarity="similar",
                            cache_dir=tmp_path / "cache")
            for name, src in (("folder", shapes), ("csv", shapes / "labels.csv"),
                              ("parquet", shapes / "labels.parquet"))}
    for name in ("csv", "parquet"):
        assert runs[name]["strategy"] == runs["folder"]["strategy"]
        assert runs[name]["val_accuracy"] == runs["folder"]["val_accuracy"]
        assert json.loads((tmp_path / name / "labels.json").read_text()) == \
            json.loads((tmp_path / "folder" / "labels.json").read_text())
    assert runs["csv"]["data_root"] == str(shapes / "labels.csv")
    # the same bytes share the cache: one entry per image, whichever way it was named
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = listing(shapes)
    for i, path in enumerate(rows["path"]):
        shutil.copy(shapes / path, flat / f"img{i}.jpg")
    pd.DataFrame({"file": [f"img{i}.jpg" for i in range(len(rows))], "class": rows["label"]}).to_csv(
        flat / "t.csv", index=False)
    with tables.using(TableConfig("file", "class")):
        flat_scan = scan_folder(flat / "t.csv")
    assert sorted(r.digest for r in flat_scan.images) == sorted(r.digest for r in scan_folder(shapes).images)
    assert flat_scan.classes == scan_folder(shapes).classes


@pytest.fixture
def messy(tmp_path):
    """A flat folder of real images and a table naming them with every kind of trouble."""
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=4, size=32, seed=2)
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = listing(shapes)
    for i, path in enumerate(rows["path"]):
        shutil.copy(shapes / path, folder / f"{i}.jpg")
    good = [(f"{i}.jpg", label) for i, label in enumerate(rows["label"])]
    return folder, good


def write(folder, rows, name="labels.csv"):
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(folder / name, index=False)
    return folder / name


def test_missing_repeated_conflicting_unlabelled_and_output_rows_are_skipped_with_reasons(messy):
    folder, good = messy
    (folder / "run").mkdir()
    (folder / "run" / ".finetune-output").write_text("")
    shutil.copy(folder / "0.jpg", folder / "run" / "x.jpg")
    shutil.copy(folder / "0.jpg", folder / "u.jpg")
    (folder / "old").mkdir()  # a run folder of an older version: no marker, model.keras beside labels.json
    for name in ("model.keras", "labels.json"):
        (folder / "old" / name).write_text("")
    shutil.copy(folder / "0.jpg", folder / "old" / "y.jpg")
    rows = [("old/y.jpg", good[0][1])] + good + [("gone.jpg", good[0][1]), (good[1][0], good[1][1]), (good[2][0], "other"), ("u.jpg", ""),
                   ("run/x.jpg", good[0][1])]
    scan = scan_folder(write(folder, rows))
    reasons = {s.path: s.reason for s in scan.skipped}
    assert reasons["gone.jpg"].startswith("cannot read")
    assert "listed with 2 labels" in reasons[good[2][0]]
    assert reasons["u.jpg"].startswith("no label in labels.csv row")
    assert "finetune's own output" in reasons["run/x.jpg"] and "finetune's own output" in reasons["old/y.jpg"]
    assert len(scan.images) == len(good) - 1  # the conflicting image; the repeat counted once
    assert any("repeat an image" in w for w in scan.warnings) and any("two or more labels" in w for w in scan.warnings)


def test_rows_outside_the_tables_folder_are_refused_unless_allowed(messy, tmp_path):
    folder, good = messy
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(folder / "0.jpg", outside)
    os.symlink(outside, folder / "link.jpg")
    for path in ("../elsewhere.jpg", str(outside), "link.jpg"):
        table = write(folder, good + [(path, good[0][1])])
        with pytest.raises(FolderError, match=r"row \d+ \(line \d+\): .* lies outside the table's folder"):
            scan_folder(table)
        with tables.using(TableConfig(allow_outside=True)):
            assert len(scan_folder(table).images) == len(good) + 1


def test_malformed_tables_are_one_line_errors_naming_what_is_wrong(messy):
    folder, good = messy
    bad = folder / "bad.csv"
    bad.write_text("path,label\n0.jpg,a\n1.jpg,b,extra\n")
    with pytest.raises(FolderError, match="not a readable table: .*line 3"):
        scan_folder(bad)
    with pytest.raises(FolderError, match="has no column 'label'"):
        pd.DataFrame({"path": ["0.jpg"], "cls": ["a"]}).to_csv(folder / "c.csv", index=False)
        scan_folder(folder / "c.csv")
    with pytest.raises(FolderError, match=r"row 2 \(line 3\) has no 'path'"):
        scan_folder(write(folder, [good[0], ("", "a")]))
    with pytest.raises(FolderError, match="holds a slash"):
        scan_folder(write(folder, [good[0], ("1.jpg", "a/b")]))
    with pytest.raises(FolderError, match="only one label"):
        scan_folder(write(folder, [(p, "same") for p, _ in good]))
    (folder / "latin.csv").write_bytes("path,label\n0.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(FolderError, match="not UTF-8"):
        scan_folder(folder / "latin.csv")
    assert TABLE.path_column == "path"  # nothing above changed the defaults


def test_the_command_line_reads_a_table_with_its_own_column_names(messy):
    folder, good = messy
    pd.DataFrame({"file": [p for p, _ in good], "class": [label for _, label in good]}).to_csv(
        folder / "t.csv", index=False)
    result = invoke("inspect", folder / "t.csv", "--path-column", "file", "--label-column", "class", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_images"] == len(good)
    result = invoke("inspect", folder / "t.csv", "--json")  # the default columns are not there
    assert result.exit_code != 0 and "has no column 'path', 'label'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
