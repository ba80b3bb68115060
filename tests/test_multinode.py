"""Two "nodes" of one process each on this machine: two torchrun launches joined by a c10d rendezvous on
127.0.0.1 (CPU, gloo). They train, write each checkpoint once (one writer per output directory: a shared
one, and node-local ones with --save_on_each_node), and resume from node-local copies; node-local
directories without --save_on_each_node, and node-local copies of different steps, are errors before any
weights load."""

import json
import shutil
import socket
import subprocess
import sys
import uuid
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import train_latent_comm as tlc
from conftest import REPO_ROOT
from test_cli import ENV, base_args

# Records every call of save_trained_parts (the trained parts of a checkpoint or of the final directory)
# with the writing process's rank, then runs the script's main.
COUNTING_DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc

original = tlc.save_trained_parts

def counted(model, run, output_dir, *args, **kwargs):
    with open(os.environ["WRITES_LOG"], "a") as f:
        f.write(json.dumps([int(os.environ["RANK"]), os.path.abspath(output_dir)]) + "\\n")
    return original(model, run, output_dir, *args, **kwargs)

tlc.save_trained_parts = counted
sys.exit(tlc.main(sys.argv[1:]))
"""

FLAGS = ("--eval_ratio", "0.25", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--ddp_backend", "gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(assets, tmp_path, out_dirs, *extra, expect=0):
    """Start two single-process nodes at once (one torchrun each, node i writing to out_dirs[i]); return
    the (rank, directory) of every save_trained_parts call."""
    driver = tmp_path / "driver.py"
    driver.write_text(COUNTING_DRIVER.format(repo=str(REPO_ROOT)))
    log = tmp_path / f"writes-{uuid.uuid4().hex}.jsonl"
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", uuid.uuid4().hex]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--node_rank", str(i), str(driver),
             *base_args(assets, out_dirs[i], *FLAGS, *extra)],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**ENV, "WRITES_LOG": str(log)},
            cwd=tmp_path,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, output in zip(nodes, outputs):
        assert (node.returncode == 0) == (expect == 0), output[-8000:]
    writes = [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []
    return writes, outputs


def written_dirs(out):
    names = [".partial-checkpoint-2", ".partial-checkpoint-4", ""]
    return {str((out / name).resolve()) for name in names}


@pytest.mark.slow
def test_two_nodes_train_save_once_and_resume_from_node_local_copies(assets, tmp_path):
    # 1. A shared output directory (both nodes see it) with --save_on_each_node: two writers would rename
    #    the same checkpoint at once, so the main process alone writes, each checkpoint once.
    shared = tmp_path / "shared"
    writes, outputs = two_nodes(assets, tmp_path, [shared, shared], "--save_on_each_node")
    assert "every node sees the same --output_dir" in "".join(outputs)
    assert Counter(d for _, d in writes) == {d: 1 for d in written_dirs(shared)}, writes
    assert {rank for rank, _ in writes} == {0}
    for step in (2, 4):
        checkpoint = shared / f"checkpoint-{step}"
        assert tlc.is_complete_checkpoint(checkpoint)
        assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not list(shared.glob(".partial-*")) and not list(shared.glob(".node-probe-*"))
    state = json.loads((shared / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and any("eval_ce" in h for h in state["log_history"])

    # 2. Node-local disks: each node has its own output directory holding its copy of checkpoint-2. With
    #    --save_on_each_node each node's process writes its own directory, once per checkpoint; both resume
    #    from their copies and end where the uninterrupted run ended.
    local = [tmp_path / "node0", tmp_path / "node1"]
    for out in local:
        shutil.copytree(shared / "checkpoint-2", out / "checkpoint-2")
    writes, outputs = two_nodes(assets, tmp_path, local, "--save_on_each_node", "--resume_from_checkpoint")
    assert "each of the 2 nodes writes checkpoints to its own --output_dir" in "".join(outputs)
    expected = {d: 1 for out in local for d in written_dirs(out) if "checkpoint-2" not in d}
    assert Counter(d for _, d in writes) == expected, writes
    writers = [{rank for rank, d in writes if d.startswith(str(out.resolve()))} for out in local]
    assert sorted(map(len, writers)) == [1, 1] and writers[0] != writers[1]  # one writer per node, its own
    reference = load_file(str(shared / tlc.LATENT_MODULES_NAME))
    for out in local:
        assert tlc.is_complete_checkpoint(out / "checkpoint-4")
        resumed = load_file(str(out / tlc.LATENT_MODULES_NAME))
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)

    # 3. Node-local disks without --save_on_each_node: only the main process's node would have checkpoints
    #    (resume and the best model at the end would fail elsewhere): a clear error before any weights load.
    separate = [tmp_path / "sep0", tmp_path / "sep1"]
    writes, outputs = two_nodes(assets, tmp_path, separate, expect=2)
    assert not writes
    assert "is not shared between the 2 nodes" in "".join(outputs) and "--save_on_each_node" in "".join(outputs)

    # 4. Node-local copies of different steps: resuming would put the nodes at different steps.
    for out, step in zip(local, (2, 4)):
        shutil.rmtree(out)
        shutil.copytree(shared / f"checkpoint-{step}", out / f"checkpoint-{step}")
    writes, outputs = two_nodes(assets, tmp_path, local, "--save_on_each_node", "--resume_from_checkpoint", expect=2)
    assert not writes
    assert "would resume from different checkpoints (['checkpoint-2', 'checkpoint-4'])" in "".join(outputs)
