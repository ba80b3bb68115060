"""Two-process launches on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 train, save, resume and reload."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, SCRIPT
from test_cli import ENV, assert_reloaded_model_reproduces_eval, assert_trained_parts_only, base_args

# 3 eval records over 2 processes with batches of 2: the sharded loader repeats one record to even out
# the last batch, and the evaluation must not count it twice.
SPLIT = ("--eval_ratio", "0.25")
LAUNCH_FLAGS = {
    "ddp": ["--ddp_backend", "gloo"],
    "zero2": ["--deepspeed", str(REPO_ROOT / "configs" / "ds_z2.json")],
    "zero3": ["--deepspeed", str(REPO_ROOT / "configs" / "ds_z3.json")],
}


def torchrun(assets, out, launch, *extra):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
        *base_args(assets, out, *SPLIT, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2"),
        *LAUNCH_FLAGS[launch], *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600, cwd=out.parent)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero2", "zero3"])
def test_two_process_run_trains_saves_resumes_and_reloads(assets, tmp_path, launch):
    out = tmp_path / launch
    torchrun(assets, out, launch)
    assert_trained_parts_only(out, assets)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert any("eval_ce_no_latent" in h for h in state["log_history"])
    assert_reloaded_model_reproduces_eval(assets, out, tmp_path, *SPLIT)

    # DeepSpeed's own checkpoints (for resuming) hold the trained parameters only, never the teacher's.
    for states in out.glob("checkpoint-*/global_step*/*model_states.pt"):
        saved = torch.load(states, map_location="cpu", weights_only=True)
        assert not any(key.startswith("teacher.") for key in saved["module"]), states
        assert saved.get("frozen_param_fragments") is None, states
    if launch != "ddp":
        assert list(out.glob("checkpoint-*/global_step*/*model_states.pt"))

    # Resuming from the first checkpoint ends with the same trained weights as the uninterrupted run.
    resumed = tmp_path / f"{launch}_resumed"
    torchrun(assets, resumed, launch, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    first, second = (
        load_file(str(out / "latent_modules.safetensors")),
        load_file(str(resumed / "latent_modules.safetensors")),
    )
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4)
    assert Path(resumed, "student", "model.safetensors").is_file()
