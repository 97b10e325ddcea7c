"""make merge / python -m finqa_trl.merge: bad input is one line and never deletes what is not a model."""

from __future__ import annotations

import shutil

import pytest

from finqa_trl import train
from finqa_trl.merge import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert train.main(["--config", "recipes/smoke.yaml", "--output_dir", str(out), "--max_steps", "1"]) == 0
    return out


def test_missing_run_directory_is_one_line(capsys):
    assert main(["outputs/no-such-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_overwrite_replaces_a_merged_model_but_never_another_folder(adapter, tmp_path, capsys):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main([str(adapter), "--output", str(keep)]) == 2
    assert main([str(adapter), "--output", str(keep), "--overwrite"]) == 2
    assert (keep / "notes.txt").read_text() == "mine"
    assert "holds no model" in capsys.readouterr().err

    merged = tmp_path / "merged"
    assert main([str(adapter), "--output", str(merged)]) == 0
    (merged / "stale.safetensors").write_text("old shard")
    assert main([str(adapter), "--output", str(merged), "--overwrite"]) == 0
    assert (merged / "config.json").is_file() and not (merged / "stale.safetensors").exists()


def test_a_merged_checkpoint_keeps_its_runs_recipe(adapter, tmp_path):
    # Checkpoints hold no recipe.yaml (the run folder does); the merged model must still say how it trained.
    ckpt = adapter / "checkpoint-x"
    ckpt.mkdir(exist_ok=True)
    for f in adapter.iterdir():
        if f.is_file() and f.name != "recipe.yaml":
            shutil.copy(f, ckpt / f.name)
    assert main([str(ckpt), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "recipe.yaml").read_text() == (adapter / "recipe.yaml").read_text()
