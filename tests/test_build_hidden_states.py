"""build_hidden_states.py: both modes against direct computations, resume after interruption, validation."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import build_hidden_states as bhs
import train_latent_comm as tlc
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def plans_file(assets, tmp_path_factory):
    _, plans = tlc.demo_conversations(12)
    path = tmp_path_factory.mktemp("plans") / "plans.json"
    path.write_text(json.dumps(plans))
    return str(path), plans


def build_args(assets, out, *extra):
    return ["--model_name_or_path", assets["teacher"], "--data_path", assets["data"], "--output_dir", str(out), *extra]


def rows_of(path):
    dataset = datasets.load_from_disk(str(path)).with_format("numpy")
    return {row["task_id"]: (row["hidden_state"], row["plan"]) for row in dataset}


def test_teacher_forced_plain_equals_the_teacher_over_each_plan(assets, plans_file, tmp_path):
    """Every position of `tokenizer(plan)`, the decoder's last (normed) layer: what the demo assets were made
    with; batched and sharded output matches record by record; training's store reads it."""
    path, plans = plans_file
    out = tmp_path / "hidden"
    assert bhs.main(build_args(assets, out, "--plans_path", path, "--batch_size", "5", "--shard_size", "4")) == 0
    built = rows_of(out)
    reference = rows_of(assets["hidden_states"])
    records = tlc.load_records(assets["data"])
    assert list(built) == [str(r["id"]) for r in records]  # all ids, in record order
    for task_id, (hidden, plan) in built.items():
        assert plan == plans[task_id]
        assert hidden.shape == reference[task_id][0].shape and hidden.shape[1] == 64
        np.testing.assert_allclose(hidden, reference[task_id][0], atol=1e-5)
    store = tlc.HiddenStateStore(str(out))
    assert store.key_column == "task_id" and len(store) == 12
    assert not (tmp_path / "hidden.partial").exists()  # shards cleaned up after assembly


def test_teacher_forced_chat_keeps_only_the_plan_positions(assets, plans_file, tmp_path):
    path, plans = plans_file
    out = tmp_path / "hidden"
    assert (
        bhs.main(
            build_args(assets, out, "--plans_path", path, "--plan_context", "chat", "--hidden_state_dtype", "float16")
        )
        == 0
    )
    built = rows_of(out)
    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    record = tlc.parse_conversations(tlc.load_records(assets["data"]), tlc.ProblemLog())[1]
    prompt = bhs.planning_prompt_ids(
        tokenizer, record.messages[record.first_user_index][1], bhs.DEFAULT_PLAN_PROMPT_TEMPLATE
    )
    assert "The task is: You are in the middle" in tokenizer.decode(prompt)  # the user message, in the template
    plan_ids = tokenizer(plans[record.id], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([prompt + plan_ids])).last_hidden_state[0, len(prompt) :]
    stored = built[record.id][0]
    assert datasets.load_from_disk(str(out)).features["hidden_state"].dtype == "float16"
    assert stored.shape == (len(plan_ids), 64)
    np.testing.assert_allclose(stored.astype(np.float32), hidden.numpy(), atol=2e-2, rtol=1e-2)


def test_generate_mode_stores_the_generated_plan_states(assets, tmp_path):
    """Greedy generation, batched with left padding, equals a per-record greedy loop without padding; the
    stored states are the model's hidden states over those tokens, and `plan` is their text."""
    records = tlc.load_records(assets["data"])
    for i, record in enumerate(records):  # first user messages of different lengths
        first_user = next(t for t in record["conversations"] if t["from"] == "human")
        first_user["value"] += " Be quick." * (i % 3)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "hidden"
    args = ["--model_name_or_path", assets["teacher"], "--data_path", str(data), "--output_dir", str(out),
            "--mode", "generate", "--do_sample", "False", "--max_plan_tokens", "7", "--batch_size", "5"]  # fmt: skip
    assert bhs.main(args) == 0
    built = rows_of(out)
    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    conversations = tlc.parse_conversations(records, tlc.ProblemLog())
    assert list(built) == [c.id for c in conversations]
    lengths = set()
    for conv in conversations[:6]:  # records of the first two batches, padded to different lengths
        ids = bhs.planning_prompt_ids(
            tokenizer, conv.messages[conv.first_user_index][1], bhs.DEFAULT_PLAN_PROMPT_TEMPLATE
        )
        lengths.add(len(ids))
        generated = []
        with torch.no_grad():
            for _ in range(7):
                token = model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax().item()
                if token == tokenizer.eos_token_id:
                    break
                generated.append(token)
            hidden = model.model(input_ids=torch.tensor([ids + generated])).last_hidden_state[0, len(ids) :]
        stored, plan = built[conv.id]
        assert stored.shape == (max(len(generated), 1), 64)
        np.testing.assert_allclose(stored, hidden.numpy()[: stored.shape[0]], atol=1e-4)
        assert plan == tokenizer.decode(generated, skip_special_tokens=True)
    assert len(lengths) > 1, "the check needs prompts of different lengths in one batch"


def test_interrupted_build_resumes_and_matches_an_uninterrupted_one(assets, tmp_path, monkeypatch):
    """Sampled plans: shard i is seeded with seed + i, so the resumed build writes exactly what one run would;
    completed shards are not recomputed and a half-written temporary shard is ignored."""
    sampled = ("--mode", "generate", "--max_plan_tokens", "5", "--shard_size", "4", "--batch_size", "4")
    full = tmp_path / "full"
    assert bhs.main(build_args(assets, full, *sampled)) == 0

    out = tmp_path / "resumed"
    original = bhs.write_shard
    calls = []

    def write_two_then_die(path, rows, features):
        calls.append(path.name)
        if len(calls) == 3:
            path.with_suffix(".arrow.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        original(path, rows, features)

    monkeypatch.setattr(bhs, "write_shard", write_two_then_die)
    with pytest.raises(KeyboardInterrupt):
        bhs.main(build_args(assets, out, *sampled))
    partial = tmp_path / "resumed.partial"
    assert sorted(p.name for p in partial.glob("*.arrow")) == ["shard-00000.arrow", "shard-00001.arrow"]
    assert not out.exists()

    batches = []
    original_generate = bhs.generate_batch
    monkeypatch.setattr(bhs, "write_shard", original)
    monkeypatch.setattr(
        bhs, "generate_batch", lambda m, t, batch, *a: batches.append(len(batch)) or original_generate(m, t, batch, *a)
    )
    assert bhs.main(build_args(assets, out, *sampled)) == 0
    assert batches == [4], "only the missing shard is computed"
    resumed, reference = rows_of(out), rows_of(full)
    assert list(resumed) == list(reference)
    for task_id, (hidden, plan) in reference.items():
        assert resumed[task_id][1] == plan
        np.testing.assert_array_equal(resumed[task_id][0], hidden)
    assert not partial.exists()

    # Killed after the finished dataset was moved into place but before the clean-up: a rerun only cleans up.
    partial.mkdir()
    (partial / "shard-00000.arrow").write_bytes(b"left over")
    assert bhs.main(build_args(assets, out, *sampled)) == 0
    assert not partial.exists() and list(rows_of(out)) == list(reference)


def test_a_partial_build_with_other_settings_is_not_resumed(assets, plans_file, tmp_path, capsys):
    out = tmp_path / "hidden"
    partial = tmp_path / "hidden.partial"
    partial.mkdir()
    (partial / bhs.BUILD_CONFIG_NAME).write_text(json.dumps({"mode": "generate"}))
    assert bhs.main(build_args(assets, out, "--plans_path", plans_file[0])) == 2
    assert "partial build with other settings" in capsys.readouterr().err


def test_invalid_records_stop_before_weights_load(assets, tmp_path):
    """One `error:` line naming every kind of problem with ids, exit status 2, no traceback; the model path
    does not even exist, so the data were checked first."""
    records = tlc.load_records(assets["data"])
    records[1]["conversations"][0]["from"] = "narrator"
    records.append(dict(records[0]))  # duplicate id
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    plans = {str(r["id"]): "a plan" for r in records[:5]}  # records 5.. have no plan
    plans_path = tmp_path / "plans.json"
    plans_path.write_text(json.dumps(plans))
    args = ["--model_name_or_path", str(tmp_path / "no_such_model"), "--data_path", str(data),
            "--plans_path", str(plans_path), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "build_hidden_states.py"), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    message = lines[-1]
    assert "unknown role 'narrator' (ids task-1)" in message
    assert "duplicates an earlier id (ids task-0)" in message
    assert "has no plan" in message and "task-5" in message
    assert "--skip_invalid_samples" in message

    # Dropping them instead: the bad records are skipped and the missing model is the next error.
    code = bhs.main([*args, "--skip_invalid_samples"])
    assert code == 2


def test_flag_errors(assets, tmp_path, capsys):
    assert bhs.main(["--data_path", assets["data"]]) == 2
    err = capsys.readouterr().err
    assert "--model_name_or_path is required" in err and "--output_dir is required" in err
    args = build_args(assets, tmp_path / "o", "--mode", "generate", "--plan_prompt_template", "no placeholder")
    assert bhs.main(args) == 2
    assert "{task}" in capsys.readouterr().err
