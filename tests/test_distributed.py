"""Two-process launches on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 train, save and reload."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SCRIPT
from test_cli import ENV, assert_reloaded_model_reproduces_eval, assert_trained_parts_only, base_args


# 3 eval records over 2 processes with batches of 2: the sharded loader repeats one record to even out
# the last batch, and the evaluation must not count it twice.
SPLIT = ("--eval_ratio", "0.25")


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero2", "zero3"])
def test_two_process_run_trains_saves_and_reloads(assets, tmp_path, launch):
    out = tmp_path / launch
    extra = {
        "ddp": ["--ddp_backend", "gloo"],
        "zero2": ["--deepspeed", str(REPO_ROOT / "configs" / "ds_z2.json")],
        "zero3": ["--deepspeed", str(REPO_ROOT / "configs" / "ds_z3.json")],
    }[launch]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
        *base_args(assets, out, *SPLIT, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", *extra),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert_trained_parts_only(out, assets)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert any("eval_ce_no_latent" in h for h in state["log_history"])
    assert_reloaded_model_reproduces_eval(assets, out, tmp_path, *SPLIT)
