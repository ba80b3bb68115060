"""Faults: a save interrupted by SIGKILL leaves no checkpoint that looks whole; non-finite losses stop the
run (or are skipped) with a message naming the step, the term and the records; non-finite weights are
never checkpointed. Each case runs the real training with one fault injected: the kill in a subprocess, the
others in this process."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import train_latent_comm as tlc
from conftest import REPO_ROOT
from test_cli import ENV, base_args

# A run that kills itself with SIGKILL while saving the checkpoint of step N: after the trained parts and the
# optimizer are written, before the Trainer state. Only a real kill of a real process shows what is left on disk.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc

kill_in_save_at, argv = int(sys.argv[1]), sys.argv[2:]
original_rng = tlc.LatentCommTrainer._save_rng_state

def save_rng_state(self, output_dir):
    if self.state.global_step == kill_in_save_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_rng(self, output_dir)

tlc.LatentCommTrainer._save_rng_state = save_rng_state
groups = tlc.parse_args(argv)
tlc.setup_logging(groups[-1])
tlc.run_training(*groups)
"""


def run_killed_in_save(tmp_path, step, *args):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO_ROOT)))
    command = [sys.executable, str(driver), str(step), *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def _args(assets, out, *extra):
    return base_args(assets, out, "--max_steps", "6", "--eval_steps", "2", "--save_steps", "2", *extra)


def test_save_killed_midway_leaves_no_checkpoint_and_resume_takes_the_last_whole_one(assets, tmp_path):
    out = tmp_path / "run"
    result = run_killed_in_save(tmp_path, 4, *_args(assets, out))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    partial = out / ".partial-checkpoint-4"
    assert (partial / tlc.LATENT_MODULES_NAME).is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "trainer_state.json").exists()  # the kill came before the Trainer state
    assert not (out / "checkpoint-4").exists()
    assert tlc.is_complete_checkpoint(out / "checkpoint-2")
    assert tlc.last_complete_checkpoint(out) == str(out / "checkpoint-2")

    # An incomplete checkpoint-N made some other way is passed over too, and refused when named.
    fake = out / "checkpoint-9"
    fake.mkdir()
    (fake / tlc.LATENT_MODULES_NAME).write_bytes(b"")
    assert tlc.last_complete_checkpoint(out) == str(out / "checkpoint-2")
    code = tlc.main(_args(assets, out, "--resume_from_checkpoint", str(fake)))
    assert code == 2
    fake.joinpath(tlc.LATENT_MODULES_NAME).unlink()
    fake.rmdir()

    # A bare --resume_from_checkpoint resumes from checkpoint-2, saves step 4 again, whole this time.
    assert tlc.main([*_args(assets, out), "--resume_from_checkpoint"]) == 0
    assert not partial.exists()
    assert tlc.is_complete_checkpoint(out / "checkpoint-6")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # The best checkpoint that load_best_model_at_end used is a real, whole one.
    assert tlc.is_complete_checkpoint(state["best_model_checkpoint"])
    assert Path(state["best_model_checkpoint"]).parent == out


class InProcessFaults(TrainerCallback):
    """The faults that need no kill, injected into a run in this process: a non-finite KL term on the batches
    of the given optimizer steps (the value the model returns), a NaN written into `lat_bos` after a step."""

    def __init__(self, monkeypatch, nan_kl_at=(), nan_weight_at=None):
        self.state, self.nan_weight_at = None, nan_weight_at
        original_forward = tlc.LatentCommModel.forward

        def forward(model, *args, **kwargs):
            out = original_forward(model, *args, **kwargs)
            if model.training and self.state is not None and self.state.global_step + 1 in nan_kl_at:
                out["kl"] = out["kl"] * math.nan
            return out

        monkeypatch.setattr(tlc.LatentCommModel, "forward", forward)

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = state

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.nan_weight_at:
            model.lat_bos.data[0] = math.nan


def run_in_process(monkeypatch, assets, out, *extra, **faults):
    """Train with `faults` injected; returns the error's one line (as `main` prints it), or None."""
    groups = tlc.parse_args(_args(assets, out, *extra))
    try:
        tlc.run_training(*groups, callbacks=[InProcessFaults(monkeypatch, **faults)])
    except tlc.LatentCommError as err:
        return "error: " + " ".join(str(err).split())
    return None


def test_nonfinite_loss_stops_with_step_term_records_and_last_checkpoint(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    line = run_in_process(monkeypatch, assets, out, nan_kl_at=[3])
    assert line is not None
    assert "step 3: non-finite kl" in line and "ce" not in line.split("non-finite")[1].split(" on ")[0]
    ids = json.loads(line.split("records ")[1].split("]")[0].replace("'", '"') + "]")
    records = {str(r["id"]) for r in json.loads(Path(assets["data"]).read_text())}
    assert len(ids) == 2 and set(ids) <= records  # the two records of that batch
    assert str(out / "checkpoint-2") in line and "--skip_nonfinite_batches" in line
    assert tlc.is_complete_checkpoint(out / "checkpoint-2")
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]


def test_skip_nonfinite_batches_skips_up_to_n_then_stops(assets, tmp_path, monkeypatch, caplog):
    out = tmp_path / "skip"
    caplog.set_level(logging.WARNING, logger="train_latent_comm")
    assert run_in_process(monkeypatch, assets, out, "--skip_nonfinite_batches", "1", nan_kl_at=[3]) is None
    assert "step 3: non-finite kl" in caplog.text and "skipped (1 of" in caplog.text
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    step3 = next(h for h in history if h.get("step") == 3 and "loss" in h)
    assert step3["kl"] == 0 and step3["align"] == 0 and step3["loss"] == 0  # the skipped batch's terms
    for name, tensor in load_file(str(out / tlc.LATENT_MODULES_NAME)).items():
        assert torch.isfinite(tensor).all(), name

    out = tmp_path / "exhausted"
    line = run_in_process(monkeypatch, assets, out, "--skip_nonfinite_batches", "1", nan_kl_at=[3, 5])
    assert line is not None and "step 5: non-finite kl" in line


def test_nonfinite_weights_are_never_checkpointed(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    line = run_in_process(monkeypatch, assets, out, nan_weight_at=4)
    assert line is not None
    assert "step 4: the trained weights are non-finite (lat_bos)" in line and str(out / "checkpoint-2") in line
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]


def test_bare_resume_flag_means_latest(assets, tmp_path):
    argv = base_args(assets, tmp_path / "out", "--resume_from_checkpoint")
    assert tlc.parse_args(argv)[3].resume_from_checkpoint == "latest"
    argv = base_args(assets, tmp_path / "out", "--resume_from_checkpoint", "--max_steps", "3")
    groups = tlc.parse_args(argv)
    assert groups[3].resume_from_checkpoint == "latest" and groups[3].max_steps == 3


if os.name != "posix":  # SIGKILL
    pytestmark = pytest.mark.skip("POSIX only")
