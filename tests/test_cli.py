"""End to end through the command line: train, evaluate, save, resume, reload; the demo; accumulation."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_latent_comm as tlc
from conftest import SCRIPT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(args, timeout=900):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def base_args(assets, output_dir, *extra):
    return [
        "--teacher_model_name_or_path", assets["teacher"],
        "--student_model_name_or_path", assets["student"],
        "--data_path", assets["data"],
        "--hf_hidden_repo", assets["hidden_states"],
        "--output_dir", str(output_dir),
        "--K", "4", "--model_max_length", "256", "--head_num_heads", "4",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--learning_rate", "1e-3", "--eval_ratio", "0.2",
        "--logging_steps", "1", "--eval_steps", "3", "--save_steps", "3",
        "--use_cpu", "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip


def safetensors_shapes(directory):
    shapes = {}
    for file in Path(directory).rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                shapes[f"{file}:{key}"] = tuple(f.get_slice(key).get_shape())
    return shapes


def assert_trained_parts_only(directory, assets):
    """The artifacts of a trained run are there, and no tensor of the teacher's is."""
    for name in ("student/config.json", "latent_modules.safetensors", "teacher_markers.safetensors",
                 "teacher_tokenizer/tokenizer_config.json", "latent_config.json"):  # fmt: skip
        assert Path(directory, name).is_file(), name
    files = {str(f.relative_to(directory)) for f in Path(directory).glob("**/*.safetensors")}
    files = {f for f in files if not f.startswith(("demo_assets", "checkpoint-"))}
    assert files == {"student/model.safetensors", "latent_modules.safetensors", "teacher_markers.safetensors"}
    teacher_embedding = next(s for k, s in safetensors_shapes(assets["teacher"]).items() if "embed_tokens" in k)
    for key, shape in safetensors_shapes(directory).items():
        assert "demo_assets" in key or shape != teacher_embedding, f"teacher embedding saved: {key}"
    with safe_open(str(Path(directory, "latent_modules.safetensors")), "pt") as f:
        assert all(k.startswith(tlc.LATENT_MODULE_PREFIXES) for k in f.keys())
    with safe_open(str(Path(directory, "teacher_markers.safetensors")), "pt") as f:
        assert f.get_tensor("input").shape == (2, 64)


def test_train_evaluate_save_resume_reload(assets, tmp_path):
    out = tmp_path / "run"
    assert tlc.main(base_args(assets, out, "--max_steps", "6", "--hub_token", "hf_not_a_real_secret")) == 0
    assert_trained_parts_only(out, assets)
    for step in (3, 6):
        assert_trained_parts_only(out / f"checkpoint-{step}", assets)
        assert (out / f"checkpoint-{step}" / "optimizer.pt").is_file()

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "ce" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(train_logs) == 6 and len(eval_logs) == 2
    for h in train_logs:
        assert all(k in h and h[k] == h[k] for k in ("loss", "ce", "kl", "align"))
    for h in eval_logs:
        for k in ("eval_ce", "eval_kl", "eval_align", "eval_ce_no_latent", "eval_ce_data_latent"):
            assert k in h
    assert "hf_not_a_real_secret" not in (out / "run_args.json").read_text()  # secrets are masked
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["LatentArguments"]["K"] == 4 and "transformers" in run_args["versions"]

    # Resume from the first checkpoint in a new directory: it continues at step 3 and ends at step 6,
    # with the same final weights as the uninterrupted run.
    resumed = tmp_path / "resumed"
    assert tlc.main(
        base_args(assets, resumed, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-3"))
    ) == 0
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert min(h["step"] for h in state["log_history"] if "ce" in h) <= 3  # history carried over
    from safetensors.torch import load_file

    first, second = (
        load_file(str(out / "latent_modules.safetensors")),
        load_file(str(resumed / "latent_modules.safetensors")),
    )
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4)

    # Reload the final directory with the teacher and recompute the evaluation: same numbers as training's.
    assert_reloaded_model_reproduces_eval(assets, out, tmp_path)


def assert_reloaded_model_reproduces_eval(assets, out, tmp_path, *extra):
    """Reload `out` with `load_latent_model`, recompute CE over the same eval split in one process, one
    sample at a time, and compare with the eval_results.json that training wrote."""
    model, run = tlc.load_latent_model(str(out))
    assert not model.training and model.settings.K == 4
    args = tlc.parse_args(base_args(assets, tmp_path / "unused", *extra))
    _, eval_dataset, collator = tlc.build_datasets(*args, run.teacher_tokenizer, run.student_tokenizer)
    sums = {"ce": 0.0, "n": 0, "ce_no_latent": 0.0}
    with torch.no_grad():
        for i in range(len(eval_dataset)):
            terms = model(**collator([eval_dataset[i]]))
            sums["ce"] += float(terms["ce_sum"])
            sums["ce_no_latent"] += float(terms["ce_no_latent_sum"])
            sums["n"] += int(terms["n_targets"])
    final_eval = json.loads((out / "eval_results.json").read_text())
    assert sums["ce"] / sums["n"] == pytest.approx(final_eval["eval_ce"], rel=1e-4)
    assert sums["ce_no_latent"] / sums["n"] == pytest.approx(final_eval["eval_ce_no_latent"], rel=1e-4)


def test_resume_true_picks_the_last_checkpoint_and_bad_path_is_an_error(assets, tmp_path):
    args = tlc.parse_args(base_args(assets, tmp_path / "empty", "--resume_from_checkpoint", "true"))
    with pytest.raises(tlc.LatentCommError, match="no complete checkpoint"):
        tlc.resolve_resume(args[3])
    (tmp_path / "ck" / "checkpoint-2").mkdir(parents=True)
    args = tlc.parse_args(
        base_args(assets, tmp_path / "ck", "--resume_from_checkpoint", str(tmp_path / "ck" / "checkpoint-2"))
    )
    with pytest.raises(tlc.LatentCommError, match="not a checkpoint"):
        tlc.resolve_resume(args[3])


def _first_step_weights(assets, out, batch, accumulation):
    code = tlc.main(
        base_args(
            assets, out, "--max_steps", "1", "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", str(accumulation), "--optim", "sgd", "--learning_rate", "1.0",
            "--warmup_steps", "0", "--kl_weight", "0", "--align_weight", "0", "--head_dropout", "0",
            "--eval_ratio", "0", "--save_strategy", "no", "--max_grad_norm", "0",
        )
    )  # fmt: skip
    assert code == 0
    from safetensors.torch import load_file

    return load_file(str(out / "latent_modules.safetensors"))


@pytest.mark.numerics
def test_gradient_accumulation_equals_the_larger_batch(assets, tmp_path):
    """CE is normalised by the tokens of the whole accumulated batch: 2 micro-batches of 1 == 1 batch of 2."""
    big = _first_step_weights(assets, tmp_path / "b2", batch=2, accumulation=1)
    accumulated = _first_step_weights(assets, tmp_path / "b1x2", batch=1, accumulation=2)
    for key in big:
        torch.testing.assert_close(big[key], accumulated[key], atol=1e-6, rtol=1e-5)


def test_demo_trains_and_summarises(tmp_path):
    result = run_cli(["--demo", "--output_dir", str(tmp_path / "demo")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train start:" in result.stdout and "train end:" in result.stdout and "eval end:" in result.stdout
    assets = {"teacher": str(tmp_path / "demo" / "demo_assets" / "teacher")}
    assert_trained_parts_only(tmp_path / "demo", assets)


def test_help_lists_every_group(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tlc.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--teacher_model_name_or_path", "--hf_hidden_repo", "--kl_weighting", "--hidden_head_ckpt",
                 "--early_stopping_patience", "--activation_checkpointing", "--deepspeed", "--local_rank",
                 "--overwrite_output_dir"):  # fmt: skip
        assert flag in text, flag


def test_example_config_parses_and_flags_override_it(tmp_path, monkeypatch):
    """Run where its relative data paths exist and the Hub counts as online (parsing asks no Hub): the Hub ids
    stay ids, the local paths become absolute."""
    config = str(Path(tlc.__file__).parent / "configs" / "example_run.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "alfworld_hidden_states").mkdir(parents=True)
    (tmp_path / "data" / "alfworld_sft.json").write_text("[]")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var)
    model_args, data_args, latent_args, training_args = tlc.parse_args([config, "--bf16", "False", "--K", "64"])
    assert model_args.teacher_model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert data_args.data_path == str(tmp_path / "data" / "alfworld_sft.json")
    assert data_args.hf_hidden_repo == str(tmp_path / "data" / "alfworld_hidden_states")
    assert latent_args.K == 64 and training_args.gradient_accumulation_steps == 4
    assert training_args.metric_for_best_model == "eval_loss" and training_args.load_best_model_at_end
    assert training_args.activation_checkpointing


def test_bf16_on_cpu_with_activation_checkpointing_trains_float32_weights_over_a_bf16_teacher(assets, tmp_path):
    out = tmp_path / "bf16"
    code = tlc.main(
        base_args(
            assets,
            out,
            "--max_steps",
            "2",
            "--bf16",
            "--activation_checkpointing",
            "--eval_ratio",
            "0",
            "--save_strategy",
            "no",
        )
    )
    assert code == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(h[k] == h[k] and abs(h[k]) < 1e4 for h in history if "ce" in h for k in ("loss", "ce", "kl", "align"))
    for name in ("student/model.safetensors", "latent_modules.safetensors"):
        with safe_open(str(out / name), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}, name
    assert json.loads((out / "latent_config.json").read_text())["teacher_dtype"] == "bfloat16"
    model, _ = tlc.load_latent_model(str(out))
    assert model.teacher.dtype == torch.bfloat16 and model.lat_bos.dtype == torch.float32


def test_chat_format_trains_end_to_end(assets, tmp_path):
    out = tmp_path / "chat"
    args = ("--max_steps", "2", "--conversation_format", "chat", "--eval_ratio", "0", "--save_strategy", "no")
    assert tlc.main(base_args(assets, out, *args)) == 0
    config = json.loads((out / "latent_config.json").read_text())
    assert config["conversation_format"] == "chat"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "ce" in h] == [1, 2]


def test_resume_with_other_shapes_is_a_clear_error(assets, tmp_path, capsys):
    out = tmp_path / "first"
    assert tlc.main(base_args(assets, out, "--max_steps", "2", "--eval_ratio", "0", "--save_steps", "2")) == 0
    code = tlc.main(
        base_args(
            assets, tmp_path / "second", "--max_steps", "4", "--eval_ratio", "0", "--K", "6",
            "--resume_from_checkpoint", str(out / "checkpoint-2"),
        )
    )  # fmt: skip
    assert code == 2
    assert "K 4 != 6" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# One run per output_dir; resume; recorded paths; why a run stopped; activation checkpointing
# ----------------------------------------------------------------------------------------------------

TWO_STEPS = ("--max_steps", "2", "--save_steps", "1", "--eval_ratio", "0", "--save_total_limit", "5")


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    """A 2-step run (checkpoints 1 and 2), launched from another working directory with relative paths of
    the `org/name` form that the issue's `demo_assets/teacher` had (through a `models` symlink)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "models").symlink_to(Path(assets["teacher"]).parent, target_is_directory=True)
    relative = {key: f"models/{Path(path).name}" for key, path in assets.items()}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert tlc.main(base_args(relative, "run", *TWO_STEPS)) == 0
    finally:
        os.chdir(cwd)
    return root / "run"


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in Path(directory).rglob("*")}


def _one_error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_used_output_dir_is_refused_before_anything_loads(finished_run, assets, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loading started")

    monkeypatch.setattr(tlc, "build_tokenizers", must_not_run)
    monkeypatch.setattr(tlc, "build_demo_assets", must_not_run)
    before = _snapshot(finished_run)

    assert tlc.main(base_args(assets, finished_run, "--max_steps", "4")) == 2
    line = _one_error_line(capsys)
    assert "already holds another run's files (checkpoint-1, checkpoint-2," in line
    assert f"--resume_from_checkpoint (its newest checkpoint is {finished_run / 'checkpoint-2'})" in line
    assert "--overwrite_output_dir" in line
    assert tlc.main(["--demo", "--output_dir", str(finished_run)]) == 2  # the demo too, before its assets
    assert "already holds another run's files" in _one_error_line(capsys)

    # Resuming from the output_dir itself would drop the optimizer state: name the checkpoint to use.
    assert tlc.main(base_args(assets, finished_run, "--resume_from_checkpoint", str(finished_run))) == 2
    line = _one_error_line(capsys)
    assert "has no optimizer state" in line and f"resume from {finished_run / 'checkpoint-2'}" in line
    assert tlc.main(base_args(assets, finished_run, "--resume_from_checkpoint", str(finished_run / "nope"))) == 2
    assert _one_error_line(capsys).endswith(f"--resume_from_checkpoint {finished_run / 'nope'} does not exist")
    overwrite_and_resume = base_args(assets, finished_run, "--overwrite_output_dir", "--resume_from_checkpoint")
    assert tlc.main(overwrite_and_resume) == 2
    assert "pass only one of the two" in _one_error_line(capsys)
    assert _snapshot(finished_run) == before  # nothing written, nothing deleted


def test_previous_run_files_are_this_tools_outputs_only(tmp_path):
    out = tmp_path / "out"
    mine = ["checkpoint-10", "checkpoint-2", ".partial-checkpoint-12", "student", "teacher_tokenizer",
            "latent_modules.safetensors", "teacher_markers.safetensors", "latent_config.json", "run_args.json",
            "trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
            "latent_report.json", "latent_report.md", "latent_report.png", "latent_replies.jsonl"]  # fmt: skip
    theirs = ["demo_assets", "notes.txt", "checkpoint-best", "checkpoint-2.bak", "student.json", "runs"]
    for name in theirs:
        (out / name).mkdir(parents=True)
    assert tlc.previous_run_files(out) == []
    args = tlc.parse_args(["--demo", "--output_dir", str(out)])[3]
    tlc.prepare_output_dir(args, None)  # the demo's assets and unrelated files are not a run
    for name in mine:
        (out / name).mkdir()
    found = tlc.previous_run_files(out)
    assert found[:3] == ["checkpoint-2", "checkpoint-10", ".partial-checkpoint-12"] and sorted(found) == sorted(mine)


def test_overwrite_deletes_the_old_run_whole_and_a_bare_resume_continues_the_new_one(
    finished_run, assets, tmp_path, caplog
):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    (out / ".partial-checkpoint-7").mkdir()  # left by a save that was killed
    (out / "demo_assets").mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-best").mkdir()  # not a checkpoint-N of this tool's
    flags = ("--max_steps", "1", "--save_steps", "1", "--eval_ratio", "0", "--seed", "3")
    assert tlc.main(base_args(assets, out, *flags, "--overwrite_output_dir")) == 0
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint-1", "demo_assets", "notes.txt", "checkpoint-best"} <= names
    assert not names & {"checkpoint-2", ".partial-checkpoint-7"}
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert json.loads((out / "run_args.json").read_text())["LatentTrainingArguments"]["seed"] == 3

    caplog.set_level(logging.INFO, logger="train_latent_comm")
    flags = ("--max_steps", "2", "--save_steps", "1", "--eval_ratio", "0", "--seed", "3")
    assert tlc.main(base_args(assets, out, *flags, "--resume_from_checkpoint")) == 0
    assert f"Resuming from {out / 'checkpoint-1'} (step 1)." in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert {"checkpoint-1", "checkpoint-2"} <= {p.name for p in out.iterdir()}


def test_local_paths_are_recorded_absolute_and_the_run_reloads_from_elsewhere(finished_run, tmp_path, monkeypatch):
    models = finished_run.parent / "models"
    config = json.loads((finished_run / tlc.LATENT_CONFIG_NAME).read_text())
    assert config["teacher_model_name_or_path"] == str(models / "teacher")
    assert config["student_model_name_or_path"] == str(models / "student")
    data = json.loads((finished_run / tlc.RUN_ARGS_NAME).read_text())["DataArguments"]
    assert data["data_path"] == str(models / "conversations.json")
    assert data["hf_hidden_repo"] == str(models / "hidden_states")
    monkeypatch.chdir(tmp_path)  # where `models/teacher` means nothing
    model, run = tlc.load_latent_model(str(finished_run))
    assert run.settings.K == 4 and not model.training


def test_a_teacher_gone_at_reload_is_one_line_naming_the_argument_that_replaces_it(
    finished_run, assets, tmp_path, monkeypatch, capsys
):
    import evaluate_latent as ev

    out = tmp_path / "run"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("checkpoint-*"))
    config_path = out / tlc.LATENT_CONFIG_NAME
    config = json.loads(config_path.read_text())

    def record_teacher(path):
        config_path.write_text(json.dumps({**config, "teacher_model_name_or_path": path}))

    record_teacher(str(tmp_path / "moved" / "teacher"))
    with pytest.raises(tlc.LatentCommError, match="no such local directory; pass its weights with "
                       r"load_latent_model\(\.\.\., teacher_model_name_or_path=\.\.\.\)"):  # fmt: skip
        tlc.load_latent_model(str(out))
    assert ev.main(["report", "--output_dir", str(out), "--split", "all"]) == 2
    line = _one_error_line(capsys)
    assert "cannot load the teacher recorded in" in line and "evaluate_latent.py's --teacher_model_name_or_path" in line
    model, _ = tlc.load_latent_model(str(out), assets["teacher"])  # the override
    assert model.teacher.config.hidden_size == 64

    # Runs recorded before paths were made absolute: a relative path still resolves from the current directory,
    # and one that exists nowhere is a clear error (offline: at once, without asking the Hub).
    monkeypatch.chdir(Path(assets["teacher"]).parent.parent)
    record_teacher(os.path.relpath(assets["teacher"]))
    assert tlc.load_latent_model(str(out))[1].settings.K == 4
    record_teacher("demo_assets/teacher")
    with pytest.raises(tlc.LatentCommError, match="not in the Hugging Face cache .HF_HUB_OFFLINE is set"):
        tlc.load_latent_model(str(out))


def test_early_stopping_says_why_the_run_stopped(assets, tmp_path, capsys):
    # A threshold no improvement can reach: patience runs out at the second evaluation.
    flags = ("--max_steps", "8", "--eval_steps", "1", "--save_steps", "1", "--early_stopping_patience", "1",
             "--early_stopping_threshold", "100")  # fmt: skip
    assert tlc.main(base_args(assets, tmp_path / "run", *flags)) == 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    step, best = state["global_step"], state["best_global_step"]
    assert step < 8
    out = capsys.readouterr().out
    assert f"Stopped early at step {step} of 8: eval_loss did not improve by more than 100.0 for 1 evaluations" in out
    assert f"(--early_stopping_patience 1); the best, eval_loss {state['best_metric']:.4f} at step {best}" in out


def test_activation_checkpointing_reaches_both_models_without_a_deprecation_warning(assets, tmp_path):
    flags = ("--max_steps", "1", "--eval_ratio", "0", "--save_strategy", "no")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = tlc.parse_args(base_args(assets, tmp_path / "ac", *flags, "--activation_checkpointing"))
        trainer = tlc.run_training(*groups)
    assert not [w for w in caught if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
    model = trainer.model
    assert model.is_activation_checkpointing
    assert model.teacher.is_activation_checkpointing and model.student.is_activation_checkpointing
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["loss"])
    # The deprecated spelling warns: the capture above would have seen it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tlc.parse_args(base_args(assets, tmp_path / "gc", *flags, "--gradient_checkpointing"))
    assert any(issubclass(w.category, FutureWarning) and "gradient_checkpointing" in str(w.message) for w in caught)


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks a machine without an accelerator")
def test_torchrun_without_use_cpu_on_a_cpu_machine_stops_at_once_with_one_line(assets, tmp_path):
    args = [a for a in base_args(assets, tmp_path / "out", "--max_steps", "2") if a != "--use_cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    output = f"exit status {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode != 0, output
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # Each rank prints the same line (torchrun may stop the second before it does); nothing else of ours.
    assert 1 <= len(ours) <= 2 and set(ours) == {
        "error: 2 processes were launched (WORLD_SIZE=2) on a machine without a GPU: add --use_cpu to run them "
        "on the CPU"
    }, output
    assert "Loading weights" not in result.stdout + result.stderr and "parallel_mode" not in result.stderr, output
    assert not (tmp_path / "out").exists(), output  # stopped before any work: no weights, no output


def test_limit_cpu_threads_shares_the_cores_under_a_launcher_unless_told(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name; torchrun's is LOCAL_WORLD_SIZE
    cores = len(os.sched_getaffinity(0))
    try:
        assert tlc.limit_cpu_threads(use_cpu=False) is None  # GPUs: not ours to touch
        assert tlc.limit_cpu_threads(use_cpu=True) == max(1, cores // 2) == torch.get_num_threads()
        assert os.environ["OMP_NUM_THREADS"] == str(max(1, cores // 2))  # accelerate keeps a set value
        assert tlc.limit_cpu_threads(use_cpu=True) is None  # OMP_NUM_THREADS is set now: left alone
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_SIZE", "1")
        assert tlc.limit_cpu_threads(use_cpu=True) is None  # one process
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_agree_on_a_used_output_dir_and_one_of_them_clears_it(assets, tmp_path):
    """Both ranks refuse the same directory; with --overwrite_output_dir one deletes and the other waits
    (it must not save into, or list, a half-cleared directory)."""
    out = tmp_path / "out"
    (out / "checkpoint-40").mkdir(parents=True)
    (out / "checkpoint-40" / "optimizer.pt").write_bytes(b"old")
    (out / tlc.LATENT_MODULES_NAME).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT]
    flags = ("--max_steps", "2", "--save_steps", "1", "--eval_ratio", "0", "--save_total_limit", "5")

    result = subprocess.run([*launch, *base_args(assets, out, *flags)], capture_output=True, text=True, env=ENV,
                            timeout=300, cwd=tmp_path)  # fmt: skip
    ours = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert result.returncode != 0 and len(ours) == 1, result.stderr[-3000:]
    assert "already holds another run's files (checkpoint-40, latent_modules.safetensors)" in ours.pop()

    result = subprocess.run([*launch, *base_args(assets, out, *flags, "--overwrite_output_dir")], capture_output=True,
                            text=True, env=ENV, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    with safe_open(str(out / tlc.LATENT_MODULES_NAME), "pt") as f:
        assert all(k.startswith(tlc.LATENT_MODULE_PREFIXES) for k in f.keys())
