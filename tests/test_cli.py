"""End to end through the command line: train, evaluate, save, resume, reload; the demo; accumulation."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_latent_comm as tlc
from conftest import SCRIPT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(args, timeout=300):
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
    result = run_cli(base_args(assets, out, "--max_steps", "6", "--hub_token", "hf_not_a_real_secret"))
    assert result.returncode == 0, result.stderr[-3000:]
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
    result = run_cli(
        base_args(assets, resumed, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-3"))
    )
    assert result.returncode == 0, result.stderr[-3000:]
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
    start = time.time()
    result = run_cli(["--demo", "--output_dir", str(tmp_path / "demo")])
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train start:" in result.stdout and "train end:" in result.stdout and "eval end:" in result.stdout
    assert elapsed < 120
    assets = {"teacher": str(tmp_path / "demo" / "demo_assets" / "teacher")}
    assert_trained_parts_only(tmp_path / "demo", assets)


def test_help_lists_every_group(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tlc.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--teacher_model_name_or_path", "--hf_hidden_repo", "--kl_weighting", "--hidden_head_ckpt",
                 "--early_stopping_patience", "--gradient_checkpointing", "--deepspeed", "--local_rank"):  # fmt: skip
        assert flag in text, flag


def test_example_config_parses_and_flags_override_it():
    config = str(Path(tlc.__file__).parent / "configs" / "example_run.yaml")
    model_args, data_args, latent_args, training_args = tlc.parse_args([config, "--bf16", "False", "--K", "64"])
    assert model_args.teacher_model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert latent_args.K == 64 and training_args.gradient_accumulation_steps == 4
    assert training_args.metric_for_best_model == "eval_loss" and training_args.load_best_model_at_end


def test_bf16_with_gradient_checkpointing_trains_float32_weights_over_a_bf16_teacher(assets, tmp_path):
    out = tmp_path / "bf16"
    code = tlc.main(
        base_args(
            assets,
            out,
            "--max_steps",
            "2",
            "--bf16",
            "--gradient_checkpointing",
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
