"""safetensors exports and ``hf://`` paths: an export placed in a Hub-style cache loads offline and predicts as
the original; pickles from the Hub are never executed; pushing is checked up to the upload (no network here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from analysis.export import _leaves, reproducing_command, upload_plan
from analysis.export import main as export_main
from pretrain import compose_config
from tests.conftest import REPO
from tests.helpers.eval_and_visualize import evaluate_cli, last_eval
from training.config import parse_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A Hugging Face cache holding ``repo_id`` at ``main`` with ``files`` (path in repo -> local file), as `hf download` leaves it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, snapshot / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def offline(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "ema"
    assert export_main([str(runs["ema"]), str(out), "--format", "safetensors"]) == 0
    return out


def test_a_safetensors_export_holds_weights_config_and_a_model_card(exported: Path, runs: dict[str, Path]) -> None:
    assert sorted(path.name for path in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    record = json.loads((exported / "config.json").read_text())
    assert record["weights"] == "ema" and record["step"] == 6
    assert record["metrics"]["eval/exact_accuracy"] == last_eval(runs["ema"])["eval/exact_accuracy"]
    card = (exported / "README.md").read_text()
    assert "| eval/exact_accuracy |" in card and "python pretrain.py" in card and "hf://OWNER/REPO" in card
    assert upload_plan(exported) == [(name, (exported / name).stat().st_size) for name in ("README.md", "config.json", "model.safetensors")]


def test_the_model_cards_command_composes_the_same_config(runs: dict[str, Path]) -> None:
    logged = yaml.safe_load((runs["ema"] / "config.yaml").read_text())
    logged.pop("numerics")  # what the run measured of its machine, beside the settings
    config = parse_config(logged)
    command = reproducing_command(config).split()
    assert command[:2] == ["python", "pretrain.py"] and "ema=true" in command and "ema_rate=0.5" in command
    again = compose_config(command[2:])
    location = ("runs_root", "run_dir", "run_name", "project_name", "load_checkpoint", "resume", "progress_bar", "device", "wandb")
    differ = [key for key, value in _leaves(config.model_dump(mode="json")).items() if _leaves(again.model_dump(mode="json")).get(key) != value]
    assert [key for key in differ if not key.startswith(location)] == []


def test_an_export_in_the_hub_cache_loads_offline_and_predicts_as_the_original(exported: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    files = {f"exports/v1/{path.name}": path for path in exported.iterdir()}
    cache = hub_cache(tmp_path / "hf", "alice/trm-sudoku", files)
    assert evaluate_cli(str(runs["ema"] / "checkpoints" / "step_00000006.pt"), "--out", str(tmp_path / "local")) == 0
    source = "hf://alice/trm-sudoku/exports/v1@main"
    done = offline(cache, "-m", "analysis.evaluate", source, "--device", "cpu", "--quiet", "--out", str(tmp_path / "hub"))
    assert done.returncode == 0, done.stderr
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())["metrics"]
    from_hub = json.loads((tmp_path / "hub" / "metrics.json").read_text())
    assert from_hub["metrics"] == local and from_hub["checkpoint"].endswith("exports/v1/model.safetensors")
    # init_from takes the weights; load_checkpoint, which continues a training state, says to use init_from.
    data = str(json.loads((exported / "config.json").read_text())["config"]["data_paths"][0])
    common = [f"data_paths=[{data}]", f"runs_root={tmp_path / 'runs'}", "device=cpu", "progress_bar=false", "wandb.mode=disabled", "max_steps=1"]
    arch = [f"arch.{key}={value}" for key, value in (("hidden_size", 32), ("num_heads", 2), ("expansion", 2), ("L_layers", 1), ("H_cycles", 2))]
    arch += ["arch.L_cycles=1", "arch.halt_max_steps=3", "global_batch_size=16", "epochs=4", "ema=true"]
    fine_tune = offline(cache, "pretrain.py", *common, *arch, "init_from=hf://alice/trm-sudoku/exports/v1", "run_name=ft")
    assert fine_tune.returncode == 0, fine_tune.stderr
    assert "model.safetensors" in fine_tune.stdout
    resumed = offline(cache, "pretrain.py", *common, *arch, "load_checkpoint=hf://alice/trm-sudoku/exports/v1", "run_name=lc")
    assert resumed.returncode == 2 and "init_from=" in resumed.stderr and "Traceback" not in resumed.stderr


def test_a_pickle_from_the_hub_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "step_10"
    torch.save({"model.inner.embed_tokens.embedding_weight": Payload()}, evil)  # a torch file whose unpickling runs a command
    (tmp_path / "all_config.yaml").write_text("arch:\n  hidden_size: 32\n")
    cache = hub_cache(tmp_path / "hf", "mallory/trm", {"ckpt/step_10": evil, "ckpt/all_config.yaml": tmp_path / "all_config.yaml"})
    done = offline(cache, "-m", "analysis.evaluate", "hf://mallory/trm/ckpt", "--device", "cpu", "--quiet")
    assert done.returncode == 2 and "never loaded" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def test_offline_and_not_cached_is_one_error_line(tmp_path: Path) -> None:
    done = offline(tmp_path / "empty-cache", "-m", "analysis.evaluate", "hf://alice/missing", "--device", "cpu")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Hub cache" in lines[0], done.stderr
    bad = offline(tmp_path, "-m", "analysis.evaluate", "hf://just-a-name", "--device", "cpu")
    assert bad.returncode == 2 and "expected hf://OWNER/REPO" in bad.stderr


def test_push_to_hub_is_checked_before_the_upload(exported: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    refused = offline(tmp_path, "-m", "analysis.export", str(runs["ema"]), str(tmp_path / "ref"), "--push-to-hub", "alice/trm")
    assert refused.returncode == 2 and "--format safetensors" in refused.stderr and not (tmp_path / "ref").exists()
    out = tmp_path / "push"
    done = offline(tmp_path, "-m", "analysis.export", str(runs["ema"]), str(out), "--format", "safetensors", "--push-to-hub", "alice/trm")
    assert done.returncode == 2 and "--push-to-hub alice/trm" in done.stderr and "is kept" in done.stderr, done.stderr
    assert "Uploading 3 files" in done.stdout and (out / "model.safetensors").is_file()
    with pytest.raises(Exception, match="pickled checkpoints"):
        upload_plan(runs["ema"] / "checkpoints")


def test_a_reference_checkpoint_in_a_hub_folder_loads_with_its_config(tmp_path: Path) -> None:
    """The layout of published reference runs (e.g. ChanBeDu/arctrm-c: FOLDER/all_config.yaml and FOLDER/step_N):
    naming the file fetches it with the all_config.yaml beside it, and it scores as the local copy."""
    from tests.conftest import FIXTURES

    source = FIXTURES / "reference" / "checkpoints" / "trm_mlpt_sudoku"
    cache = hub_cache(tmp_path / "hf", "alice/arctrm", {"mini-GC/step_3": source / "step_3", "mini-GC/all_config.yaml": source / "all_config.yaml"})
    data = str(FIXTURES / "reference" / "sudoku")
    assert evaluate_cli(str(source / "step_3"), "--data", data, "--out", str(tmp_path / "local")) == 0
    done = offline(
        cache,
        "-m",
        "analysis.evaluate",
        "hf://alice/arctrm/mini-GC/step_3",
        "--data",
        data,
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(tmp_path / "hub"),
    )
    assert done.returncode == 0, done.stderr
    assert "(all_config.yaml)" in done.stderr and "is missing" not in done.stderr  # fetched beside the file
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())["metrics"]
    assert json.loads((tmp_path / "hub" / "metrics.json").read_text())["metrics"] == local
