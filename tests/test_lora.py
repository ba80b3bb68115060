"""LoRA students (--lora_r): only the adapters, the bridge and the head learn; the rollout runs through the
adapters; checkpoints hold the adapters, not the student's base weights; save, resume, reload and a
two-process run reproduce the latents."""

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate_latent as ev
import train_latent_comm as tlc
from test_cli import assert_reloaded_model_reproduces_eval, base_args
from test_model import PROMPTS, left_padded, make_batch

LATENT_PREFIXES = ("lat_bos", "h2e.", "student_proj.", "head.")


def lora_student(assets, r=4, dropout=0.0, randomise_b=True):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    student = tlc.add_lora_adapters(student, tlc.ModelArguments(lora_r=r, lora_dropout=dropout))
    if randomise_b:  # peft starts B at zero (the adapters then add nothing): make them matter
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return student


@pytest.fixture()
def lora_model(assets):
    """The tiny teacher and a LoRA student (tied embeddings), K=5, dropout off."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    student = lora_student(assets)
    vocab = teacher.config.vocab_size
    settings = tlc.LatentSettings(K=5, bop_id=vocab - 2, eop_id=vocab - 1, kl_window=16)
    return tlc.LatentCommModel(teacher, student, settings, head_num_heads=4, head_dropout=0.0)


def test_gradients_reach_only_adapters_bridge_and_head(lora_model, assets, tokenizer):
    model = lora_model.train()
    assert model.student.get_input_embeddings().weight is model.student.get_output_embeddings().weight  # tied
    model(**make_batch(assets, tokenizer, model.settings.K))["loss"].backward()
    adapters = []
    for name, p in model.named_parameters():
        trained = "lora_" in name or name.startswith(LATENT_PREFIXES)
        assert p.requires_grad == trained, name
        if not trained:  # base student weights (the tied embedding among them) and the teacher
            assert p.grad is None, name
        elif "lora_" in name:
            adapters.append(name)
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Every attention and MLP projection of every layer has its A and B.
    layers = model.student.config.num_hidden_layers
    assert len(adapters) == layers * 7 * 2, adapters


def test_rollout_runs_through_the_adapters(lora_model, tokenizer):
    """The rollout calls the student's decoder and embeddings directly: its latents must be those of the
    student with the adapters merged into its weights, and differ from the base student's."""
    model = lora_model.eval()
    _, ids, mask = left_padded(tokenizer, PROMPTS)
    with torch.no_grad():
        latents = model.student_latents(ids, mask)
        merged = copy.deepcopy(model)
        merged.student = merged.student.merge_and_unload()  # a plain model with W + scale * B A
        assert not tlc.is_lora_student(merged.student)
        torch.testing.assert_close(latents, merged.student_latents(ids, mask), atol=1e-5, rtol=1e-5)
        with model.student.disable_adapter():
            base = model.student_latents(ids, mask)
    assert (latents - base).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_adapter_gradients(assets, tokenizer):
    """The prefill's input comes from frozen embeddings (no gradient): checkpointed layers must still give
    the adapters inside them their gradients."""
    _, ids, mask = left_padded(tokenizer, PROMPTS)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
        vocab = teacher.config.vocab_size
        settings = tlc.LatentSettings(K=5, bop_id=vocab - 2, eop_id=vocab - 1)
        model = tlc.LatentCommModel(teacher, lora_student(assets), settings, 4, 0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        latents = model.student_latents(ids, mask)
        latents.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if "lora_" in n}
        results.append((latents.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def assert_adapters_only(student_dir):
    files = {p.name for p in Path(student_dir).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files), files
    keys = load_file(str(Path(student_dir, "adapter_model.safetensors"))).keys()
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), sorted(keys)[:5]


def test_lora_run_saves_adapters_resumes_and_reloads(assets, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="train_latent_comm")
    out = tmp_path / "run"
    lora = ("--lora_r", "4", "--lora_alpha", "8")
    assert tlc.main(base_args(assets, out, "--max_steps", "6", *lora)) == 0
    assert "Trainable parameters" in caplog.text and "LoRA adapters" in caplog.text
    for directory in (out, out / "checkpoint-3", out / "checkpoint-6"):
        assert_adapters_only(directory / tlc.STUDENT_DIR)
    config = json.loads((out / tlc.LATENT_CONFIG_NAME).read_text())
    assert config["lora"]["base_model_name_or_path"] == str(Path(assets["student"]).resolve())
    assert (config["lora"]["r"], config["lora"]["alpha"]) == (4, 8)
    trained = load_file(str(out / tlc.STUDENT_DIR / "adapter_model.safetensors"))
    assert any(("lora_B" in k) and v.abs().max() > 0 for k, v in trained.items())  # the adapters learned

    # Resume from the first checkpoint: the same adapters and latent modules as the uninterrupted run.
    resumed = tmp_path / "resumed"
    resume = ("--resume_from_checkpoint", str(out / "checkpoint-3"))
    assert tlc.main(base_args(assets, resumed, "--max_steps", "6", *lora, *resume)) == 0
    for name in (f"{tlc.STUDENT_DIR}/adapter_model.safetensors", tlc.LATENT_MODULES_NAME):
        first, second = load_file(str(out / name)), load_file(str(resumed / name))
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4, msg=key)

    # Reload (base student + adapters): training's final evaluation is reproduced, and so are the latents.
    assert_reloaded_model_reproduces_eval(assets, out, tmp_path)
    model, run = tlc.load_latent_model(str(out))
    again, _ = tlc.load_latent_model(str(resumed))
    assert tlc.is_lora_student(model.student)
    _, ids, mask = left_padded(run.student_tokenizer, PROMPTS)
    with torch.no_grad():
        latents, latents_again = model.student_latents(ids, mask), again.student_latents(ids, mask)
    torch.testing.assert_close(latents, latents_again, atol=1e-5, rtol=1e-4)

    # evaluate_latent.py works on the LoRA run.
    replies = tmp_path / "replies.jsonl"
    args = ["--output_dir", str(out), "--output_file", str(replies), "--max_new_tokens", "3", "--limit", "2"]
    assert ev.main(["generate", *args]) == 0
    assert len(replies.read_text().splitlines()) == 2

    # Mismatched flags are one clear error, before training.
    assert tlc.main(base_args(assets, tmp_path / "full", "--max_steps", "6", *resume)) == 2
    assert "lora_r 4 != 0" in capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    full = tlc.LatentCommModel(
        model.teacher, AutoModelForCausalLM.from_pretrained(assets["student"]), model.settings, 4, 0.1
    )
    with pytest.raises(tlc.LatentCommError, match="holds LoRA adapters, but this model has a full student"):
        tlc.load_trained_parts(full, str(out))


def test_lora_flag_errors(assets, tmp_path, capsys):
    code = tlc.main(base_args(assets, tmp_path / "x", "--max_steps", "1", "--lora_r", "4",
                              "--lora_target_modules", "c_attn,c_proj"))  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: --lora_target_modules c_attn,c_proj") and "Traceback" not in err
    with pytest.raises(tlc.LatentCommError, match="--lora_dropout"):
        tlc.parse_args(base_args(assets, tmp_path / "y", "--lora_r", "4", "--lora_dropout", "1.5"))


# ----------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on CPU)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_lora_trains_resumes_and_reloads(assets, tmp_path):
    from test_distributed import SPLIT, torchrun

    out, resumed = tmp_path / "ddp", tmp_path / "resumed"
    torchrun(assets, out, "ddp", "--lora_r", "4", resume_into=resumed)  # then resumed from checkpoint-2
    assert_adapters_only(out / tlc.STUDENT_DIR)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert_reloaded_model_reproduces_eval(assets, out, tmp_path, *SPLIT)

    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 4
    for name in (f"{tlc.STUDENT_DIR}/adapter_model.safetensors", tlc.LATENT_MODULES_NAME):
        first, second = load_file(str(out / name)), load_file(str(resumed / name))
        for key in first:
            torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_zero3_lora_saves_adapters_only_and_reloads(assets, tmp_path):
    """Under ZeRO-3 the adapters are gathered for saving; DeepSpeed's own checkpoint holds the trained
    parameters only (no base student or teacher weights)."""
    from test_distributed import SPLIT, torchrun

    out = tmp_path / "zero3"
    torchrun(assets, out, "zero3", "--lora_r", "4")
    assert_adapters_only(out / tlc.STUDENT_DIR)
    trained = load_file(str(out / tlc.STUDENT_DIR / "adapter_model.safetensors"))
    assert any(("lora_B" in k) and v.abs().max() > 0 for k, v in trained.items())  # gathered, not empty shards
    states = list(out.glob("checkpoint-*/global_step*/*model_states.pt"))
    assert states
    for path in states:
        saved = torch.load(path, map_location="cpu", weights_only=True)["module"]
        others = [k for k in saved if "lora_" not in k and not k.startswith(LATENT_PREFIXES)]
        assert not others, others  # e.g. the tied lm_head.weight alias of the frozen embedding
    assert_reloaded_model_reproduces_eval(assets, out, tmp_path, *SPLIT)
