"""The head stage (--stage head): the HiddenStateHead trained alone, so that the frozen teacher reading
[<bop>, head(data latent), <eop>] predicts the conversation. No student is loaded; the head file it writes is
what the student's stage reads with --hidden_head_ckpt; checkpoints, resume, evaluation and the guard rails
work as in the student's stage."""

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import evaluate_latent as ev
import train_latent_comm as tlc
from conftest import SCRIPT
from test_cli import ENV, _one_error_line

HEAD_FILE = tlc.HEAD_FILE_NAME


def head_args(assets, output_dir, *extra):
    """The flags of test_cli's runs for the head stage: no student."""
    return [
        "--stage", "head",
        "--teacher_model_name_or_path", assets["teacher"],
        "--data_path", assets["data"],
        "--hf_hidden_repo", assets["hidden_states"],
        "--output_dir", str(output_dir),
        "--K", "4", "--model_max_length", "256", "--head_num_heads", "4",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--learning_rate", "1e-3", "--eval_ratio", "0.2",
        "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "2", "--max_steps", "4",
        "--use_cpu", "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "True",
        *extra,
    ]  # fmt: skip


class Snapshots(TrainerCallback):
    """The trained parameters (those the optimizer holds) and every weight, as training starts."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters()}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def stage_one(assets, tmp_path_factory):
    """A 4-step head stage (checkpoints at 2 and 4, evaluations there), given the student's-stage flags a
    shared config file would hold: they are named as unused, and nothing of the student is loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("head_stage") / "run"
    loaded = []

    def recording(original):
        def load(name_or_path, *args, **kwargs):
            loaded.append(str(name_or_path))
            return original(name_or_path, *args, **kwargs)

        return load

    snapshots, records = Snapshots(), Records()
    logger = logging.getLogger("train_latent_comm")
    logger.addHandler(records)
    unused = ("--student_model_name_or_path", assets["student"], "--kl_weight", "0.1", "--lora_r", "8")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(AutoModelForCausalLM, "from_pretrained", recording(AutoModelForCausalLM.from_pretrained))
            patch.setattr(AutoTokenizer, "from_pretrained", recording(AutoTokenizer.from_pretrained))
            groups = tlc.parse_args(head_args(assets, out, *unused))
            trainer = tlc.run_training(*groups, callbacks=[snapshots])
    finally:
        logger.removeHandler(records)
    return SimpleNamespace(out=out, trainer=trainer, loaded=loaded, snapshots=snapshots, log=records.messages)


def test_the_head_stage_trains_the_head_alone_without_a_student(stage_one, assets):
    trainer, snapshots = stage_one.trainer, stage_one.snapshots
    model = trainer.model
    assert isinstance(model, tlc.HeadStageModel) and not hasattr(model, "student")
    assert set(stage_one.loaded) == {assets["teacher"]}  # models and tokenizers: never the student's
    # The optimizer holds exactly the head's parameters; the teacher ends as it started (markers included).
    assert snapshots.optimized == {id(p) for p in model.head.parameters()}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    for name, p in model.named_parameters():
        if name.startswith("teacher."):
            assert torch.equal(p, snapshots.weights[name]), name
    assert any(not torch.equal(p, snapshots.weights[f"head.{n}"]) for n, p in model.head.named_parameters())
    unused = next(m for m in stage_one.log if m.startswith("--stage head trains the head alone"))
    assert f"--student_model_name_or_path {assets['student']}, --lora_r 8, --kl_weight 0.1" in unused


def test_the_head_stage_logs_evaluates_and_writes_a_head_file_with_checkpoints(stage_one, assets):
    out = stage_one.out
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "ce" in h]
    eval_logs = [h for h in history if "eval_ce" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3, 4] and [h["step"] for h in eval_logs] == [2, 4]
    assert all(h["loss"] == pytest.approx(h["ce"], abs=1e-6) and not {"kl", "align"} & set(h) for h in train_logs)
    for h in eval_logs:
        assert h["eval_loss"] == h["eval_ce"] and "eval_kl" not in h
    # The teacher alone does not change; with the data latent, the CE moves as the head trains.
    assert eval_logs[0]["eval_ce_no_latent"] == eval_logs[1]["eval_ce_no_latent"]
    assert eval_logs[0]["eval_ce"] != eval_logs[1]["eval_ce"]

    assert {p.name for p in out.iterdir()} >= {HEAD_FILE, "latent_config.json", "run_args.json", "checkpoint-2",
                                               "checkpoint-4", "eval_results.json", "trainer_state.json"}  # fmt: skip
    assert not {tlc.STUDENT_DIR, tlc.LATENT_MODULES_NAME, tlc.TEACHER_MARKERS_NAME} & {p.name for p in out.iterdir()}
    config = json.loads((out / "latent_config.json").read_text())
    assert config["stage"] == "head" and config["settings"]["K"] == 4 and config["head_output_projection"] == "glu"
    assert json.loads((out / "run_args.json").read_text())["LatentArguments"]["stage"] == "head"
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert tlc.is_complete_checkpoint(checkpoint) and (checkpoint / "optimizer.pt").is_file()
        assert json.loads((checkpoint / "latent_config.json").read_text())["stage"] == "head"
    # The head file is our safetensors layout, with the variant and the head count recorded.
    head = tlc.read_head_checkpoint(str(out / HEAD_FILE))
    assert head.output_projection == "glu" and head.num_heads == 4
    assert set(head.state) == set(stage_one.trainer.model.head.state_dict())
    final = load_file(str(out / HEAD_FILE))
    best = stage_one.trainer.state.best_model_checkpoint  # load_best_model_at_end: the final head is the best
    assert all(torch.equal(final[k], v) for k, v in load_file(str(Path(best, HEAD_FILE))).items())


def test_the_second_stage_reads_the_head_frozen_and_sees_what_the_first_evaluated(stage_one, assets, capsys):
    """The command the summary prints for stage 2 runs; its head is the file's, unchanged by training, and its
    evaluation of the data latent (run D) is the first stage's final evaluation."""
    trainer, out = stage_one.trainer, stage_one.out
    tlc.print_summary(trainer, str(out), 1.0)
    printed = capsys.readouterr().out
    assert f"head file: {out / HEAD_FILE}" in printed
    command = shlex.split(trainer.next_stage_command)
    assert trainer.next_stage_command in printed and command[:2] == ["python", "train_latent_comm.py"]
    assert command[command.index("--hidden_head_ckpt") + 1] == str(out / HEAD_FILE) and "--freeze_head" in command
    assert not {"--stage", "--lora_r"} & set(command)
    assert " ".join(tlc.STAGE_TWO_LOSS_FLAGS) in trainer.next_stage_command  # the published pipeline's weights
    stage_two = Path(command[command.index("--output_dir") + 1])
    steps = ("--max_steps", "2", "--save_steps", "1", "--eval_steps", "1", "--logging_steps", "1", "--disable_tqdm",
             "True", "--report_to", "none", "--dataloader_num_workers", "0")  # fmt: skip
    assert tlc.main(command[2:] + list(steps)) == 0

    model, run = tlc.load_latent_model(str(stage_two))
    head = tlc.HiddenStateHead(64, 4, 0.0).eval()
    tlc.load_head_checkpoint(head, str(out / HEAD_FILE))
    x = torch.randn(3, 4, 64)
    with torch.no_grad():
        assert torch.equal(model.head(x), head(x))
    assert (run.config["settings"]["kl_weight"], run.config["settings"]["align_weight"]) == (0.1, 0.1)
    first = json.loads((out / "eval_results.json").read_text())
    history = json.loads((stage_two / "trainer_state.json").read_text())["log_history"]
    for h in [h for h in history if "eval_ce_data_latent" in h]:
        assert h["eval_ce_data_latent"] == pytest.approx(first["eval_ce"], rel=1e-5)
        assert h["eval_ce_no_latent"] == pytest.approx(first["eval_ce_no_latent"], rel=1e-5)

    # Resuming across stages is refused before anything loads.
    capsys.readouterr()
    assert tlc.main(command[2:] + list(steps) + ["--resume_from_checkpoint", str(out / "checkpoint-2"),
                                                  "--output_dir", str(out.parent / "wrong")]) == 2  # fmt: skip
    error = _one_error_line(capsys)
    assert error.startswith(f"error: --resume_from_checkpoint {out / 'checkpoint-2'} is a checkpoint of --stage head")
    assert f"--hidden_head_ckpt {out / 'checkpoint-2' / HEAD_FILE} --freeze_head" in error
    stage_two_checkpoint = str(stage_two / "checkpoint-1")
    assert tlc.main(head_args(assets, out.parent / "wrong2", "--resume_from_checkpoint", stage_two_checkpoint)) == 2
    error = _one_error_line(capsys)
    assert "is a checkpoint of --stage latent (student, bridge and head): resume it without --stage head" in error
    assert not (out.parent / "wrong").exists() and not (out.parent / "wrong2").exists()



def test_resuming_the_head_stage_ends_with_the_uninterrupted_runs_head(stage_one, assets, tmp_path, caplog):
    """From checkpoint-2 to step 4 in another directory: the same head as the uninterrupted run at step 4 (its
    dropout included: the RNG state is restored), and the history carried over."""
    out = stage_one.out
    resumed = tmp_path / "resumed"
    caplog.set_level(logging.INFO, logger="train_latent_comm")
    assert tlc.main(head_args(assets, resumed, "--resume_from_checkpoint", str(out / "checkpoint-2"))) == 0
    assert f"Resuming from {out / 'checkpoint-2'} (step 2)." in caplog.text
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "ce" in h] == [1, 2, 3, 4]
    uninterrupted, continued = (load_file(str(d / "checkpoint-4" / HEAD_FILE)) for d in (out, resumed))
    assert uninterrupted.keys() == continued.keys()
    for key in uninterrupted:  # the tolerance of test_cli's resume check (one process: the same operations)
        torch.testing.assert_close(uninterrupted[key], continued[key], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(uninterrupted.values(), load_file(  # not the step-2 head
        str(out / "checkpoint-2" / HEAD_FILE)).values()))  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The model: gradients, dropout, activation checkpointing
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_batch(assets, tmp_path_factory):
    """A HeadStageModel over the tiny teacher (markers added as training adds them) and a batch of 4 records."""
    groups = tlc.parse_args(head_args(assets, tmp_path_factory.mktemp("unused") / "out", "--head_dropout", "0.5"))
    model_args, data_args, latent_args, training_args = groups
    teacher_tokenizer, student_tokenizer, new_ids = tlc.build_tokenizers(model_args, data_args, with_student=False)
    assert student_tokenizer is None
    train_dataset, _, collator = tlc.build_datasets(*groups, teacher_tokenizer, None)
    torch.manual_seed(0)
    model = tlc.build_head_stage_model(model_args, latent_args, training_args, teacher_tokenizer, new_ids)
    batch = collator([train_dataset[i] for i in range(4)])
    assert batch["student_input_ids"].shape == (4, 0)  # no student tokens
    batch.pop("record_ids")
    return model, batch


def head_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    return out, {name: p.grad.clone() for name, p in model.head.named_parameters()}


def test_gradients_reach_the_head_alone_and_checkpointing_keeps_them(head_batch):
    model, batch = head_batch
    model.train()
    for module in model.head.modules():  # dropout off, so that two runs compute the same function
        if isinstance(module, (torch.nn.Dropout, torch.nn.MultiheadAttention)):
            module.p = module.dropout = 0.0
    try:
        out, grads = head_gradients(model, batch)
        assert all(p.grad is None for p in model.teacher.parameters())
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), grads.keys()
        assert out["n_targets"] == (batch["labels"][:, 1:] != tlc.IGNORE_INDEX).sum()
        model.activation_checkpointing_enable()
        assert model.teacher.is_activation_checkpointing and model.is_activation_checkpointing
        checkpointed_out, checkpointed = head_gradients(model, batch)
        assert torch.equal(checkpointed_out["loss"], out["loss"])
        for name, grad in grads.items():  # the same operations, recomputed: float32 rounding at most
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-8, msg=name)
    finally:
        model.activation_checkpointing_disable()
        for module in model.head.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.5
            if isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.5


@torch.no_grad()
def test_head_dropout_applies_in_training_only(head_batch):
    model, batch = head_batch
    model.eval()
    first, second = model(**batch), model(**batch)
    assert torch.equal(first["ce_sum"], second["ce_sum"])
    assert first["per_sample"].shape == (4, len(tlc.HEAD_EVAL_COLUMNS))
    assert torch.allclose(first["per_sample"][:, 0].sum(), first["ce_sum"])
    model.train()
    torch.manual_seed(1)
    dropped = model(**batch)
    assert "per_sample" not in dropped and not torch.equal(dropped["ce_sum"], first["ce_sum"])
    model.eval()


# ----------------------------------------------------------------------------------------------------
# Guard rails: one line, before anything loads
# ----------------------------------------------------------------------------------------------------


def test_flags_that_contradict_the_stage_are_one_line_errors(assets, tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loading started")

    monkeypatch.setattr(tlc, "build_tokenizers", must_not_run)
    out = tmp_path / "out"
    assert tlc.main(head_args(assets, out, "--freeze_head")) == 2
    assert "--freeze_head with --stage head would train nothing" in _one_error_line(capsys)
    for spelling in (["--train_head_only"], ["--train_head_only=True"]):
        assert tlc.main(head_args(assets, out, *spelling)) == 2
        assert "--train_head_only is not a flag of this tool: the head-training stage is --stage head" in (
            _one_error_line(capsys))  # fmt: skip
    config = tmp_path / "stage.yaml"
    config.write_text("train_head_only: true\n")
    assert tlc.main([str(config), *head_args(assets, out)[2:]]) == 2
    assert "--stage head" in _one_error_line(capsys)
    assert tlc.main(head_args(assets, out, "--stage", "heads")) == 2
    assert "invalid choice: 'heads'" in _one_error_line(capsys)
    # The student's stage still needs its student; the head stage does not (it stops only at the patched loading).
    latent = [a for a in head_args(assets, out) if a not in ("--stage", "head")]
    assert tlc.main(latent) == 2
    assert _one_error_line(capsys) == "error: Missing required arguments: --student_model_name_or_path"
    with pytest.raises(AssertionError, match="loading started"):
        tlc.main(head_args(assets, out))
    assert not out.exists()


def test_a_head_stage_run_is_named_where_a_student_run_is_expected(stage_one, assets, tmp_path, capsys):
    out = stage_one.out
    with pytest.raises(tlc.LatentCommError, match=f"is a --stage head run: it holds a trained head .{out / HEAD_FILE}"):
        tlc.load_latent_model(str(out))
    assert ev.main(["report", "--output_dir", str(out)]) == 2
    assert f"--hidden_head_ckpt {out / HEAD_FILE} --freeze_head" in _one_error_line(capsys)
    # Its directory given as the head file: the message names the file in it.
    student_stage = [a for a in head_args(assets, tmp_path / "s2") if a not in ("--stage", "head")]
    student_stage += ["--student_model_name_or_path", assets["student"], "--hidden_head_ckpt", str(out)]
    assert tlc.main(student_stage) == 2
    assert f"is a directory, not a file: pass the head file in it, {out / HEAD_FILE}" in _one_error_line(capsys)


def test_unused_flags_are_the_ones_set_away_from_their_defaults(tmp_path):
    groups = tlc.parse_args(["--demo", "--stage", "head", "--output_dir", str(tmp_path)])
    assert tlc.flags_unused_by_head_stage(*groups) == []  # the demo's own kl/align weights are its defaults
    groups = tlc.parse_args(["--demo", "--stage", "head", "--output_dir", str(tmp_path), "--kl_weight", "0.5",
                             "--kl_temperature", "2", "--report", "--rollout_impl", "hf"])  # fmt: skip
    assert tlc.flags_unused_by_head_stage(*groups) == [
        "--kl_weight 0.5", "--kl_temperature 2.0", "--rollout_impl hf", "--report True"
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------------------------------


def evaluate_head_file(assets, out, *extra):
    """The head stage's evaluation recomputed in this process, one record at a time, from the saved head."""
    groups = tlc.parse_args(head_args(assets, out.parent / "unused", "--hidden_head_ckpt", str(out / HEAD_FILE),
                                      *extra))  # fmt: skip
    model_args, data_args, latent_args, training_args = groups
    tokenizer, _, new_ids = tlc.build_tokenizers(model_args, data_args, with_student=False)
    _, eval_dataset, collator = tlc.build_datasets(*groups, tokenizer, None)
    model = tlc.build_head_stage_model(model_args, latent_args, training_args, tokenizer, new_ids).eval()
    sums = torch.zeros(len(tlc.HEAD_EVAL_COLUMNS), dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(eval_dataset)):
            sums += model(**collator([eval_dataset[i]]))["per_sample"].double().sum(0)
    totals = dict(zip(tlc.HEAD_EVAL_COLUMNS, sums.tolist()))
    return totals["ce_sum"] / totals["n_targets"], totals["ce_no_latent_sum"] / totals["n_targets"]


# One launch for the whole check: a second torchrun would pay the ~9 s import of every process again. Each
# rank runs the head stage, then resumes it from its first checkpoint into another directory, in the same
# process group, and records where it wrote a head file.
DDP_DRIVER = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc

writes = []
save_head_checkpoint = tlc.save_head_checkpoint
def recording_save(head, path, *args, **kwargs):
    writes.append(os.path.relpath(path, {root!r}))
    return save_head_checkpoint(head, path, *args, **kwargs)
tlc.save_head_checkpoint = recording_save

resumed, args = sys.argv[1], sys.argv[2:]
groups = tlc.parse_args(args)
tlc.setup_logging(groups[-1])
trainer = tlc.run_training(*groups)
checkpoint = os.path.join(groups[-1].output_dir, "checkpoint-2")
tlc.run_training(*tlc.parse_args(args + ["--output_dir", resumed, "--resume_from_checkpoint", checkpoint]))
with open(os.path.join({root!r}, f"writes_rank{{dist.get_rank()}}.json"), "w") as f:
    json.dump(writes, f)
tlc.shutdown_distributed()
"""


@pytest.mark.slow
def test_two_process_ddp_head_stage_trains_writes_once_evaluates_and_resumes(assets, tmp_path):
    """Two processes (gloo): the head trains, each head file is written by one process only, the evaluation
    over both ranks' shards (3 records: one repeated to even out the last batch, counted once) equals this
    process's over the saved head, and resuming from the first checkpoint ends with the uninterrupted run's
    head (dropout on: each rank's RNG state is restored)."""
    split = ("--eval_ratio", "0.25")
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(repo=str(Path(SCRIPT).parent), root=str(tmp_path)))
    out, resumed = tmp_path / "ddp", tmp_path / "resumed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
               str(resumed), *head_args(assets, out, *split, "--ddp_backend", "gloo")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    writes = [json.loads((tmp_path / f"writes_rank{rank}.json").read_text()) for rank in (0, 1)]
    staged = [f"ddp/{tlc.PARTIAL_CHECKPOINT_PREFIX}checkpoint-{step}/{HEAD_FILE}" for step in (2, 4)]
    assert writes[1] == [] and writes[0][:3] == [*staged, f"ddp/{HEAD_FILE}"], writes
    assert writes[0][3:] == [f"resumed/{tlc.PARTIAL_CHECKPOINT_PREFIX}checkpoint-4/{HEAD_FILE}", f"resumed/{HEAD_FILE}"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2",
                                                                                             "checkpoint-4"]
    heads = [load_file(str(path)) for path in (out / "checkpoint-2" / HEAD_FILE, out / HEAD_FILE)]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # trained from step 2 to step 4

    final = json.loads((out / "eval_results.json").read_text())
    ce, ce_no_latent = evaluate_head_file(assets, out, *split)
    assert final["eval_ce"] == pytest.approx(ce, rel=1e-4)
    assert final["eval_ce_no_latent"] == pytest.approx(ce_no_latent, rel=1e-4)

    # The same two processes, the same operations from the same state: float32 rounding at most.
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 4
    continued = load_file(str(resumed / HEAD_FILE))
    for key in heads[1]:
        torch.testing.assert_close(heads[1][key], continued[key], atol=1e-5, rtol=1e-4)
