"""`tune --engine ray`: the same trials.csv as the local search, with the trials run as Ray Tune trials.

The `ray` tests start a real two-node Ray cluster on this machine (a head and one
added node, 1 CPU each, a small object store) and tear it down; they are
deselected by default (`pytest -m ray`). The option checks run without Ray.
"""

from __future__ import annotations

import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.errors import SettingsError

#: Columns that measure the run rather than the trial: wall time, and vectors a backbone pass wrote to the
#: feature cache (the cache is shared, so whichever search runs second finds them there).
MEASURED = ["seconds", "computed"]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 << 20})
    nodes.add_node(num_cpus=1, object_store_memory=80 << 20)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        assert ray.cluster_resources()["CPU"] == 2 and len(ray.nodes()) == 2
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def searched(tmp_path, shapes, tiny_base, engine: str, **options) -> tuple[dict, pd.DataFrame]:
    summary = api.tune(str(shapes), str(tiny_base), out=tmp_path / engine, seed=0, engine=engine, **options)
    return summary, pd.read_csv(tmp_path / engine / "trials.csv")


def same_trials(local: pd.DataFrame, remote: pd.DataFrame) -> None:
    assert list(remote.columns) == list(local.columns)
    assert len(remote) == len(local)
    pd.testing.assert_frame_equal(remote.drop(columns=MEASURED, errors="ignore"),
                                  local.drop(columns=MEASURED, errors="ignore"))


@pytest.mark.ray
def test_a_linear_search_on_ray_writes_the_local_trials(cluster, shapes, tiny_base, tmp_path):
    summary, remote = searched(tmp_path, shapes, tiny_base, "ray", budget=4, max_concurrent=2)
    local_summary, local = searched(tmp_path, shapes, tiny_base, "local", budget=4)
    assert len(local) == 4
    same_trials(local, remote)
    assert summary["best"] == local_summary["best"]
    assert summary["estimate"]["accuracy"] == local_summary["estimate"]["accuracy"]


@pytest.mark.ray
def test_fine_tuning_halving_on_ray_runs_the_local_rungs(cluster, shapes, tiny_base, tmp_path):
    summary, remote = searched(tmp_path, shapes, tiny_base, "ray", budget=2, recipe="partial")
    _, local = searched(tmp_path, shapes, tiny_base, "local", budget=2, recipe="partial")
    assert list(local["rung"]) == [0, 0, 1]  # 2 candidates, the better one goes on to more epochs
    same_trials(local, remote)
    assert summary["trials"] == {"total": 3, "new": 3, "earlier": 0}


def test_engine_options_are_checked_before_any_work(shapes, tiny_base, tmp_path):
    with pytest.raises(SettingsError, match="--max-concurrent .* use it with --engine ray"):
        api.tune(str(shapes), str(tiny_base), out=tmp_path / "a", max_concurrent=2)
    with pytest.raises(SettingsError, match="--address names a Ray cluster: use it with --engine ray"):
        api.tune(str(shapes), str(tiny_base), out=tmp_path / "b", address="localhost:6379")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_without_ray_tune_the_error_names_the_extra(shapes, tiny_base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.tune", None)  # as if Ray Tune were not installed: its import fails
    result = CliRunner().invoke(cli, ["tune", str(shapes), "--base", str(tiny_base), "--engine", "ray",
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == \
        "Error: --engine ray needs Ray Tune: pip install 'finetune-cli[ray]'"
    assert not (tmp_path / "s").exists()
