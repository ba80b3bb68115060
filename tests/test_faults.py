"""Faults: a save interrupted by SIGKILL leaves no checkpoint that looks whole; non-finite losses stop the
run (or are skipped) with a message naming the step, the term and the records; non-finite weights are
never checkpointed. Each case runs the real training in a subprocess with one fault injected."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_latent_comm as tlc
from conftest import REPO_ROOT
from test_cli import ENV, base_args

DRIVER = """
import json, math, os, signal, sys
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc
from transformers import TrainerCallback

fault = json.loads(os.environ["FAULT"])
trainer_ref = {{}}

class Faults(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer_ref["state"] = state
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == fault.get("nan_weight_at"):
            model.lat_bos.data[0] = math.nan

if "kill_in_save_at" in fault:
    original_rng = tlc.LatentCommTrainer._save_rng_state
    def save_rng_state(self, output_dir):
        if self.state.global_step == fault["kill_in_save_at"]:
            os.kill(os.getpid(), signal.SIGKILL)  # trained parts and optimizer written, state not yet
        return original_rng(self, output_dir)
    tlc.LatentCommTrainer._save_rng_state = save_rng_state

original_forward = tlc.LatentCommModel.forward
def forward(self, *args, **kwargs):
    out = original_forward(self, *args, **kwargs)
    state = trainer_ref.get("state")
    if self.training and state is not None and state.global_step + 1 in fault.get("nan_kl_at", []):
        out["kl"] = out["kl"] * math.nan
    return out
tlc.LatentCommModel.forward = forward

sys.argv = ["train_latent_comm.py"] + sys.argv[1:]
groups = tlc.parse_args(sys.argv[1:])
tlc.setup_logging(groups[-1])
try:
    tlc.run_training(*groups, callbacks=[Faults()])
except tlc.LatentCommError as err:
    print("error: " + " ".join(str(err).split()), file=sys.stderr)
    sys.exit(2)
"""


def run_with_fault(tmp_path, out, fault, *args):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO_ROOT)))
    env = {**ENV, "FAULT": json.dumps(fault)}
    return subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, env=env, timeout=600)


def _args(assets, out, *extra):
    return base_args(assets, out, "--max_steps", "6", "--eval_steps", "2", "--save_steps", "2", *extra)


def test_save_killed_midway_leaves_no_checkpoint_and_resume_takes_the_last_whole_one(assets, tmp_path):
    out = tmp_path / "run"
    result = run_with_fault(tmp_path, out, {"kill_in_save_at": 4}, *_args(assets, out))
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
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_latent_comm.py"), *_args(assets, out), "--resume_from_checkpoint"],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not partial.exists()
    assert tlc.is_complete_checkpoint(out / "checkpoint-6")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # The best checkpoint that load_best_model_at_end used is a real, whole one.
    assert tlc.is_complete_checkpoint(state["best_model_checkpoint"])
    assert Path(state["best_model_checkpoint"]).parent == out


def _error_line(stderr):
    lines = [line[line.index("error: ") :] for line in stderr.splitlines() if "error: " in line]  # after tqdm's
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_nonfinite_loss_stops_with_step_term_records_and_last_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    result = run_with_fault(tmp_path, out, {"nan_kl_at": [3]}, *_args(assets, out))
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert "step 3: non-finite kl" in line and "ce" not in line.split("non-finite")[1].split(" on ")[0]
    ids = json.loads(line.split("records ")[1].split("]")[0].replace("'", '"') + "]")
    records = {str(r["id"]) for r in json.loads(Path(assets["data"]).read_text())}
    assert len(ids) == 2 and set(ids) <= records  # the two records of that batch
    assert str(out / "checkpoint-2") in line and "--skip_nonfinite_batches" in line
    assert tlc.is_complete_checkpoint(out / "checkpoint-2")
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]


def test_skip_nonfinite_batches_skips_up_to_n_then_stops(assets, tmp_path):
    out = tmp_path / "skip"
    result = run_with_fault(tmp_path, out, {"nan_kl_at": [3]}, *_args(assets, out, "--skip_nonfinite_batches", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: non-finite kl" in result.stdout + result.stderr and "skipped (1 of" in result.stdout
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    step3 = next(h for h in history if h.get("step") == 3 and "loss" in h)
    assert step3["kl"] == 0 and step3["align"] == 0 and step3["loss"] == 0  # the skipped batch's terms
    for name, tensor in load_file(str(out / tlc.LATENT_MODULES_NAME)).items():
        assert torch.isfinite(tensor).all(), name

    out = tmp_path / "exhausted"
    fault = {"nan_kl_at": [3, 5]}
    result = run_with_fault(tmp_path, out, fault, *_args(assets, out, "--skip_nonfinite_batches", "1"))
    assert result.returncode == 2 and "step 5: non-finite kl" in _error_line(result.stderr)


def test_nonfinite_weights_are_never_checkpointed(assets, tmp_path):
    out = tmp_path / "run"
    result = run_with_fault(tmp_path, out, {"nan_weight_at": 4}, *_args(assets, out))
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result.stderr)
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
