"""Exact resume after SIGKILL (issue 5, item 1).

A training subprocess is killed with SIGKILL between two checkpoints, twice, and resumed each time
(`--resume_from_checkpoint true`, then an explicit checkpoint path). It must end with the same trainable
weights and log the same losses as an uninterrupted run of the same length (run in the test's process): data order (the sampler is
reseeded every epoch, and the run spans more than two epochs), the head's dropout RNG (dropout stays at
its default 0.1) and the eval split all have to survive the restarts.
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_latent_comm as tlc
from conftest import REPO_ROOT
from test_cli import ENV, base_args

# A run that imports the script and kills itself with SIGKILL at the end of optimizer step KILL_AT (0: never).
# The kill happens in on_step_end, before that step is logged or saved: nothing of it reaches the disk.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc
from transformers import TrainerCallback

kill_at, argv = int(sys.argv[1]), sys.argv[2:]


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


model_args, data_args, latent_args, training_args = tlc.parse_args(argv)
tlc.setup_logging(training_args)
tlc.run_training(model_args, data_args, latent_args, training_args, callbacks=[KillAt()])
"""

# 12 records, 20% held out: 10 train records in batches of 2 are 5 steps an epoch, so 12 steps span
# 2.4 epochs. Checkpoints (and evaluations) at steps 4, 8 and 12.
MAX_STEPS, SAVE_STEPS = 12, 4
RUN_FLAGS = (
    "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--eval_steps", str(SAVE_STEPS),
    "--save_total_limit", "5", "--load_best_model_at_end", "False", "--seed", "7",
)  # fmt: skip
# Keys of a log entry that measure time, not training. `train_loss` (the Trainer's summary at the end) is
# the mean over the steps trained *in that process*, so a resumed run reports it over fewer steps by
# design; it is checked separately below.
TIMING_KEYS = ("runtime", "per_second", "total_flos", "train_loss")


def run_driver(driver, assets, out, kill_at=0, *extra):
    command = [sys.executable, str(driver), str(kill_at), *base_args(assets, out, *RUN_FLAGS, *extra)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO_ROOT)


def trained_tensors(directory):
    """Every trainable tensor of a run directory, by file and key: the student and latent_modules."""
    tensors = {}
    for file in [
        Path(directory, "latent_modules.safetensors"),
        *sorted(Path(directory, "student").glob("*.safetensors")),
    ]:
        for key, value in load_file(str(file)).items():
            tensors[f"{file.name}:{key}"] = value
    return tensors


def logged_values(directory):
    """(step, key) -> value of every numeric log entry (train, eval and the final summary), timings left out."""
    history = json.loads(Path(directory, "trainer_state.json").read_text())["log_history"]
    values = {}
    for entry in history:
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not any(t in key for t in TIMING_KEYS):
                values[(entry["step"], key)] = float(value)
    return values


def test_killed_runs_resume_to_the_same_weights_and_losses(assets, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO_ROOT)))
    start = time.time()

    # The uninterrupted run needs no kill: it runs in this process (with as many threads as the drivers).
    reference = tmp_path / "uninterrupted"
    assert tlc.main(base_args(assets, reference, *RUN_FLAGS)) == 0

    killed = tmp_path / "killed"
    # Killed at step 6, between the checkpoints of steps 4 and 8.
    result = run_driver(driver, assets, killed, 6)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (killed / "trainer_state.json").exists()
    # Resumed from the newest checkpoint (the no-path form) and killed again at step 10 (between 8 and 12).
    result = run_driver(driver, assets, killed, 10, "--resume_from_checkpoint", "true")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    # Resumed from an explicit checkpoint path, to the end.
    result = run_driver(driver, assets, killed, 0, "--resume_from_checkpoint", str(killed / "checkpoint-8"))
    assert result.returncode == 0, result.stderr[-3000:]

    # Trainable weights: the final output and the last checkpoint, tensor by tensor.
    max_diff = 0.0
    for sub in (".", f"checkpoint-{MAX_STEPS}"):
        expected, actual = trained_tensors(reference / sub), trained_tensors(killed / sub)
        assert expected.keys() == actual.keys() and len(expected) > 10
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
            max_diff = max(max_diff, (actual[key] - expected[key]).abs().max().item())
    # The run must have trained: weights at step 12 differ from those of the checkpoint at step 4.
    early = trained_tensors(killed / "checkpoint-4")
    assert any(not torch.allclose(early[k], expected[k]) for k in expected)

    # Logged losses: every train and eval entry, including those after each checkpoint the runs resumed from.
    expected, actual = logged_values(reference), logged_values(killed)
    assert expected.keys() == actual.keys()
    steps_after_resume = {step for step, _ in expected if step > SAVE_STEPS}
    assert steps_after_resume >= set(range(5, MAX_STEPS + 1))
    for name in ("loss", "ce", "kl", "align", "grad_norm", "eval_loss", "eval_ce", "eval_kl", "eval_align"):
        steps = {step for step, key in expected if key == name}
        assert steps & steps_after_resume, f"no {name} logged after step {SAVE_STEPS}"
    for step, key in sorted(expected):
        assert math.isfinite(expected[(step, key)])
        assert actual[(step, key)] == pytest.approx(expected[(step, key)], rel=1e-5, abs=1e-6), (step, key)
    # The final process trained steps 9..12: its train_loss is the mean of the reference's losses there.
    summary = json.loads((killed / "train_results.json").read_text())["train_loss"]
    tail = [expected[(step, "loss")] for step in range(2 * SAVE_STEPS + 1, MAX_STEPS + 1)]
    assert summary == pytest.approx(sum(tail) / len(tail), rel=1e-3)
    # The eval split is the same records: the final evaluation agrees too.
    final_expected = json.loads((reference / "eval_results.json").read_text())
    final_actual = json.loads((killed / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_ce", "eval_kl", "eval_align", "eval_ce_no_latent", "eval_ce_data_latent"):
        assert final_actual[key] == pytest.approx(final_expected[key], rel=1e-5, abs=1e-6), key
    print(f"resume test: max abs weight difference {max_diff:.3g}, {time.time() - start:.1f}s for four runs")
