"""Two-process launches on CPU (gloo): DDP, DeepSpeed ZeRO-2 (through the deepspeed launcher) and ZeRO-3 train,
save, resume and reload."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_latent_comm as tlc
from conftest import REPO_ROOT
from test_cli import ENV, assert_reloaded_model_reproduces_eval, assert_trained_parts_only, base_args

# 3 eval records over 2 processes with batches of 2: the sharded loader repeats one record to even out
# the last batch, and the evaluation must not count it twice.
SPLIT = ("--eval_ratio", "0.25")
LAUNCH_FLAGS = {
    "ddp": ["--ddp_backend", "gloo"],
    "zero2": ["--deepspeed", str(REPO_ROOT / "configs" / "ds_z2.json")],
    "zero3": ["--deepspeed", str(REPO_ROOT / "configs" / "ds_z3.json")],
    "zero3_offload": ["--deepspeed", str(REPO_ROOT / "configs" / "ds_z3_offload.json")],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Trains, then (with RESUME_INTO set) resumes from checkpoint-2 into RESUME_INTO in the same processes and
# process group: a second launch would pay every process's imports (~9 s on 2 cores) again.
TRAIN_THEN_RESUME = """
import os, sys
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc

args = sys.argv[1:]
groups = tlc.parse_args(args)
tlc.setup_logging(groups[-1])
tlc.run_training(*groups)
if os.environ.get("RESUME_INTO"):
    checkpoint = os.path.join(groups[-1].output_dir, "checkpoint-2")
    tlc.run_training(*tlc.parse_args(args + ["--output_dir", os.environ["RESUME_INTO"],
                                             "--resume_from_checkpoint", checkpoint]))
tlc.shutdown_distributed()
"""


def torchrun(assets, out, launch, *extra, resume_into=None):
    """Two processes with `launch`'s flags; ZeRO-2 goes through the `deepspeed` launcher (which passes
    `--local_rank=N` on each process's command line) with length-grouped batches, the others through torchrun.
    With `resume_into`, the same processes then resume from checkpoint-2 into that directory. Returns the
    launcher's output."""
    args = [*base_args(assets, out, *SPLIT, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2"),
            *LAUNCH_FLAGS[launch], *extra]  # fmt: skip
    if launch == "zero2":
        launcher = ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
        args.append("--group_by_length")
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    driver = out.parent / "train_then_resume.py"
    driver.write_text(TRAIN_THEN_RESUME.format(repo=str(REPO_ROOT)))
    env = {**ENV, "RESUME_INTO": str(resume_into or "")}
    command = [sys.executable, *launcher, str(driver), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
@pytest.mark.parametrize("launch", list(LAUNCH_FLAGS))
def test_two_process_run_trains_saves_resumes_and_reloads(assets, tmp_path, launch):
    out, resumed = tmp_path / launch, tmp_path / f"{launch}_resumed"
    output = torchrun(assets, out, launch, resume_into=resumed)
    if launch == "zero2":
        assert "--local_rank=1" in output  # the deepspeed launcher's command line, logged
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

    # Resuming from the first checkpoint (in the same processes) ends with the uninterrupted run's weights.
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 4
    first, second = (
        load_file(str(out / "latent_modules.safetensors")),
        load_file(str(resumed / "latent_modules.safetensors")),
    )
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4)
    assert Path(resumed, "student", "model.safetensors").is_file()


def _trained_weights(out):
    weights = load_file(str(out / "latent_modules.safetensors"))
    weights.update({f"student.{k}": v for k, v in load_file(str(out / "student" / "model.safetensors")).items()})
    return weights


@pytest.mark.slow
@pytest.mark.numerics
def test_ddp_first_step_equals_one_process_over_the_same_global_batch(assets, tmp_path):
    """2 processes x batch 2 == 1 process x 2 accumulated micro-batches of 2: the same 4 records give the same
    loss terms (CE over the tokens of all 4, KL and Align averaged over the micro-batches, which is what each
    device computes), the same global gradient norm, and the same clipped gradients after DDP's reduction.

    The step is SGD with learning rate 1, so every trained weight moves by exactly its clipped gradient and the
    weights compare the gradients themselves. (AdamW's first step is about lr * sign(gradient): a parameter
    whose true gradient is ~0, such as an attention key bias, turns float32 rounding into a full step, and
    the comparison then depends on the CPU's kernels.) Dropout is off: the two ranks' random streams cannot
    match one process's."""
    max_grad_norm = 0.5
    flags = ("--max_steps", "1", "--logging_steps", "1", "--eval_ratio", "0", "--save_strategy", "no",
             "--head_dropout", "0", "--warmup_steps", "0", "--max_grad_norm", str(max_grad_norm),
             "--optim", "sgd", "--learning_rate", "1")  # fmt: skip
    ddp = tmp_path / "ddp"
    torchrun(assets, ddp, "ddp", *flags)
    single = tmp_path / "single"  # in this process, in one thread as each rank (conftest)
    assert tlc.main(base_args(assets, single, *flags, "--gradient_accumulation_steps", "2")) == 0

    logs = [json.loads((out / "trainer_state.json").read_text())["log_history"][0] for out in (ddp, single)]
    for term in ("loss", "ce", "kl", "align", "grad_norm"):
        assert logs[0][term] == pytest.approx(logs[1][term], rel=1e-4, abs=1e-5), term
    assert logs[1]["kl"] > 0 and logs[1]["align"] > 0  # every term took part
    assert logs[1]["grad_norm"] > 1.5 * max_grad_norm  # clipping took part: the step's global norm is 0.5
    before = {**load_file(str(Path(assets["student"], "model.safetensors")))}
    ddp_weights, single_weights = _trained_weights(ddp), _trained_weights(single)
    assert ddp_weights.keys() == single_weights.keys()
    # The step moves the weights by 0.5 in global L2 norm, the student's largest by ~7e-3. A wrong reduction
    # (gradients summed instead of averaged, a micro-batch lost, clipping by one rank's norm) changes the step
    # by a sizeable fraction of that. Float32 rounding (other batch shapes, another summation order) differed
    # by at most 1.2e-7 under each numerics mode of ENV.md: one unit in the last place of a weight near 1.
    for key in ddp_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], atol=1e-6, rtol=0, msg=key)
    moved = [k for k, v in before.items() if not torch.equal(v, ddp_weights[f"student.{k}"])]
    assert moved, "the step changed no student weight"


COUNTING_DRIVER = """
import json, os, sys
import torch.distributed as dist
from transformers import TrainerCallback
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc

class CountLmHeadCalls(TrainerCallback):
    calls = 0
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        lm_head = model.teacher.get_output_embeddings()
        assert hasattr(lm_head.weight, "ds_id"), "not partitioned by ZeRO-3"
        def count(module, inputs):
            CountLmHeadCalls.calls += 1
        lm_head.register_forward_pre_hook(count)
    def on_train_end(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"lm_head_calls_rank{{dist.get_rank()}}.json")
        with open(path, "w") as f:
            json.dump(CountLmHeadCalls.calls, f)

class PoisonPartitionPadding(TrainerCallback):
    # NaN into the tail that evens out ZeRO-3 partitions (DeepSpeed leaves it uninitialised), before each save.
    poisoned = 0
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.requires_grad and hasattr(p, "ds_tensor"):
                valid = max(0, p.ds_numel - p.ds_zero_partition_rank * p.ds_tensor.numel())
                tail = p.ds_tensor.view(-1)[valid:]
                tail.fill_(float("nan"))
                PoisonPartitionPadding.poisoned += tail.numel()
    def on_train_end(self, args, state, control, **kwargs):
        with open(os.path.join(args.output_dir, f"poisoned_rank{{dist.get_rank()}}.json"), "w") as f:
            json.dump(PoisonPartitionPadding.poisoned, f)

groups = tlc.parse_args(sys.argv[1:])
tlc.setup_logging(groups[-1])
tlc.run_training(*groups, callbacks=[CountLmHeadCalls(), PoisonPartitionPadding()])
tlc.shutdown_distributed()
"""


@pytest.mark.slow
def test_zero3_ranks_with_different_target_counts_call_lm_head_equally_often(assets, tmp_path):
    """ZeRO-3 gathers the teacher's partitioned lm_head weight with a collective at each call, so a rank
    that calls it more often than another hangs the job (on GPUs, where weights are released between
    calls). With one logit row a chunk and records of very different lengths, each rank's number of calls
    would follow its own target count; they must be equal (forward and backward recomputation).

    Also: the padding that evens out ZeRO-3 partitions (one element on rank 1 for each [1]-shaped gain of the
    head) is uninitialised memory; filled with NaN before the save, it must not be taken for a non-finite
    weight (it once stopped a run, 1 in 5 under load), nor reach the saved weights."""
    records = json.loads(Path(assets["data"]).read_text())
    for i, record in enumerate(records):
        if i % 2:  # every other record gets a much longer last reply
            record["conversations"][-1]["value"] += " Act: look" * (4 + 3 * i)
    data = tmp_path / "uneven.json"
    data.write_text(json.dumps(records))
    driver = tmp_path / "driver.py"
    driver.write_text(COUNTING_DRIVER.format(repo=str(REPO_ROOT)))
    out = tmp_path / "uneven"
    args = base_args(assets, out, "--data_path", str(data), "--eval_ratio", "0", "--max_steps", "3",
                     "--save_steps", "3", "--per_device_train_batch_size", "1", "--logit_chunk_rows", "1",
                     "--deepspeed", str(REPO_ROOT / "configs" / "ds_z3.json"))  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    calls = [json.loads((out / f"lm_head_calls_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert calls[0] == calls[1] > 3 * 4, calls
    assert sum(json.loads((out / f"poisoned_rank{rank}.json").read_text()) for rank in (0, 1)) > 0
    assert tlc.is_complete_checkpoint(out / "checkpoint-3")
    for name, tensor in load_file(str(out / tlc.LATENT_MODULES_NAME)).items():
        assert torch.isfinite(tensor).all(), name
