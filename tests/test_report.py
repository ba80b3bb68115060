"""The whole path on the demo assets: build hidden states -> train with --report -> report -> generate.

The report's numbers are checked against training's own evaluation and, for two conditions, against a
direct computation with full logits and a hand-built splice.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import build_hidden_states as bhs
import evaluate_latent as ev
import train_latent_comm as tlc
from conftest import SCRIPT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipeline(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    hidden = root / "hidden"
    build = ["--model_name_or_path", assets["teacher"], "--data_path", assets["data"], "--output_dir", str(hidden),
             "--mode", "generate", "--do_sample", "False", "--max_plan_tokens", "6", "--batch_size", "6"]  # fmt: skip
    assert bhs.main(build) == 0
    run = root / "run"
    train = [
        "--teacher_model_name_or_path", assets["teacher"], "--student_model_name_or_path", assets["student"],
        "--data_path", assets["data"], "--hf_hidden_repo", str(hidden), "--output_dir", str(run),
        "--K", "4", "--model_max_length", "256", "--head_num_heads", "4", "--eval_ratio", "0.25",
        "--per_device_train_batch_size", "3", "--per_device_eval_batch_size", "2", "--learning_rate", "1e-3",
        "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "2",
        "--kl_weight", "0.5", "--align_weight", "0.5", "--use_cpu", "--dataloader_num_workers", "0", "--report",
    ]  # fmt: skip
    result = subprocess.run([sys.executable, SCRIPT, *train], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"hidden": str(hidden), "run": str(run), "root": root, "stdout": result.stdout}


def load_report(directory):
    with open(f"{directory}/{ev.REPORT_JSON}") as f:
        return json.load(f)


def test_training_report_equals_training_evaluation(pipeline):
    """`--report` on the eval split reproduces training's final evaluation: student CE, KL, Align and the two
    reference runs (no latent, data latent)."""
    report = load_report(pipeline["run"])
    with open(f"{pipeline['run']}/eval_results.json") as f:
        metrics = json.load(f)
    conditions = report["conditions"]
    assert list(conditions) == list(ev.CONDITIONS)
    assert report["split"] == "eval" and report["n_records"] == 3
    pairs = {
        "eval_ce": conditions["student_latent"]["ce"],
        "eval_ce_no_latent": conditions["no_latent"]["ce"],
        "eval_ce_data_latent": conditions["data_latent"]["ce"],
        "eval_kl": report["student_objective"]["kl"],
        "eval_align": report["student_objective"]["align"],
        "eval_loss": report["student_objective"]["loss"],
    }
    for key, value in pairs.items():
        assert value == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    assert conditions["data_latent"]["kl_to_data_latent"] == pytest.approx(0, abs=1e-6)
    assert conditions["data_latent"]["cosine_to_data_latent"] == pytest.approx(1, abs=1e-5)
    for condition in conditions.values():
        assert 0 <= condition["accuracy"] <= 1


def test_training_prints_where_the_report_is(pipeline):
    lines = pipeline["stdout"].splitlines()
    files = ", ".join(f"{pipeline['run']}/{name}" for name in (ev.REPORT_JSON, ev.REPORT_MD, ev.REPORT_PNG))
    assert f"  latent report: {files}" in lines
    conditions = load_report(pipeline["run"])["conditions"]
    assert "    teacher CE: " + ", ".join(f"{n} {c['ce']:.4f}" for n, c in conditions.items()) in lines


def test_chart_and_table(pipeline):
    run = pipeline["run"]
    with open(f"{run}/{ev.REPORT_PNG}", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    image = matplotlib.image.imread(f"{run}/{ev.REPORT_PNG}")
    assert image.ndim == 3 and image.shape[0] > 600 and image.shape[1] > 1200  # conditions, loss and 3 terms
    assert image.std() > 0.05  # not a blank canvas
    table = open(f"{run}/{ev.REPORT_MD}").read()
    for name in ev.CONDITIONS:
        assert f"| {name} |" in table
    history = json.load(open(f"{run}/trainer_state.json"))["log_history"]
    curves = ev.training_curves(history)
    assert set(curves) == set(ev.CURVE_KEYS) and len(curves["ce"][0]) == 4


def test_the_figure_shows_the_differences_and_the_reference_runs(pipeline):
    """What makes the PNG readable: CE on an axis fitted to the values (not from 0) with each value written,
    the no-latent and data-latent evaluation CE drawn next to the student's, KL and Align on their own axes,
    whole optimizer steps."""
    import matplotlib.pyplot as plt

    report = load_report(pipeline["run"])
    history = json.load(open(f"{pipeline['run']}/trainer_state.json"))["log_history"]
    fig = ev.report_figure(report, history)
    try:
        conditions, loss, ce, kl, align = fig.axes
        values = [c["ce"] for c in report["conditions"].values()]
        low, high = conditions.get_xlim()
        assert 0 < low < min(values) and max(values) < high  # the axis does not start at 0
        # The values' spread fills at least half the axis, or the axis spans under 5% of the values.
        assert max(values) - min(values) >= 0.5 * (high - low) or high - low <= 0.05 * max(values)
        texts = " ".join(t.get_text() for t in conditions.texts)
        for name, c in report["conditions"].items():
            assert f"{c['ce']:.4f}" in texts and f"acc {c['accuracy']:.3f}" in texts
        assert [t.get_text() for t in conditions.get_yticklabels()] == list(report["conditions"])[::-1]
        labels = {line.get_label(): line for line in ce.get_lines()}
        for key, label in (("eval_ce_no_latent", "eval, no latent"), ("eval_ce_data_latent", "eval, data latent"),
                           ("eval_ce", "eval (student latent)"), ("ce", "train (student latent)")):  # fmt: skip
            steps = [h["step"] for h in history if key in h]
            assert list(labels[label].get_xdata()) == steps and steps
        assert {line.get_label() for line in kl.get_lines()} == {"train", "eval"}
        assert {line.get_label() for line in align.get_lines()} == {"train", "eval"}
        assert kl.get_ylim() != align.get_ylim() and "KL" in kl.get_title() and "Align" in align.get_title()
        for ax in (loss, ce, kl, align):
            fig.canvas.draw()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


@torch.no_grad()
def test_report_command_against_a_direct_computation(pipeline, assets, tmp_path):
    """`evaluate_latent.py report` on the run's eval split: the same numbers as `--report`, and no_latent /
    cross_task_latent equal to full-logit computations over a hand-built splice."""
    out = tmp_path / "report"
    assert ev.main(["report", "--output_dir", pipeline["run"], "--report_dir", str(out), "--batch_size", "3"]) == 0
    report = load_report(out)
    trained = load_report(pipeline["run"])
    # Other batches (3 against training's 2), the same numbers: noise included, drawn per record from one seed.
    for name in ev.CONDITIONS:
        for key in ("ce", "accuracy"):
            assert report["conditions"][name][key] == pytest.approx(trained["conditions"][name][key], rel=1e-5)

    model, run = tlc.load_latent_model(pipeline["run"])
    K, bop, eop = run.settings.K, run.settings.bop_id, run.settings.eop_id
    store = tlc.HiddenStateStore(pipeline["hidden"])
    data_args = tlc.DataArguments(model_max_length=256)
    conversations = tlc.parse_conversations(tlc.load_records(assets["data"]), tlc.ProblemLog())
    samples = [
        tlc.encode_conversation(c, store.row_of[c.id], run.teacher_tokenizer, run.student_tokenizer, data_args, K)
        for c in conversations
    ]
    _, eval_idx = tlc.split_train_eval(len(samples), 0.25, 42)  # the training run's flags and default seed
    samples = [samples[i] for i in eval_idx]
    assert [r["id"] for r in report["records"]] == [s.record_id for s in samples]

    embed, teacher = model.teacher.get_input_embeddings(), model.teacher
    totals = {"no_latent": [0.0, 0, 0], "cross_task_latent": [0.0, 0, 0]}
    for i, sample in enumerate(samples):
        ids = torch.tensor(sample.input_ids, dtype=torch.long)
        labels = torch.tensor(sample.labels)
        s = sample.insert_pos
        other = samples[(i + 1) % len(samples)]
        block = model.head(torch.from_numpy(store.latent_rows(other.hidden_row, K))[None])[0]  # eval mode: no dropout
        spliced = torch.cat(
            [embed(ids[:s]), embed(torch.tensor([bop])), block, embed(torch.tensor([eop])), embed(ids[s:])]
        )
        logits = {
            "no_latent": teacher(input_ids=ids[None]).logits[0],
            "cross_task_latent": teacher(inputs_embeds=spliced[None]).logits[0],
        }
        for t in range(1, len(ids)):
            if labels[t] == tlc.IGNORE_INDEX:
                continue
            rows = {"no_latent": t - 1, "cross_task_latent": t - 1 + (K + 2 if t >= s else 0)}
            for name, row in rows.items():
                totals[name][0] += F.cross_entropy(logits[name][row], labels[t]).item()
                totals[name][1] += int(logits[name][row].argmax() == labels[t])
                totals[name][2] += 1
    for name, (nll, correct, count) in totals.items():
        assert count == report["n_targets"]
        assert report["conditions"][name]["ce"] == pytest.approx(nll / count, rel=1e-4)
        assert report["conditions"][name]["accuracy"] == pytest.approx(correct / count)


def test_noise_moments_and_cross_task_order(pipeline):
    order = ev.cross_task_order(5)
    assert sorted(order) == list(range(5)) and all(i != j for i, j in enumerate(order))
    store = tlc.HiddenStateStore(pipeline["hidden"])
    rows = list(store.row_of.values())[:4]
    samples = [
        tlc.EncodedSample(str(r), r, np.zeros(2, np.int32), np.zeros(2, bool), 1, np.zeros(2, np.int32)) for r in rows
    ]
    dataset = tlc.LatentCommDataset(samples, store, 3)
    mean, std = ev.data_latent_moments(dataset)
    stacked = np.concatenate([store.latent_rows(r, 3) for r in rows])  # [4 * K, H]
    np.testing.assert_allclose(mean.numpy(), stacked.mean(0), atol=1e-5)
    np.testing.assert_allclose(std.numpy(), stacked.std(0), atol=1e-4)


def test_generate_command_writes_side_by_side_replies_into_the_run(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--output_dir", pipeline["run"], "--max_new_tokens", "5", "--compare_no_latent",
            "--batch_size", "2"]  # fmt: skip
    assert ev.main(args) == 0
    out = Path(pipeline["run"], tlc.REPLIES_NAME)  # without --output_file: next to the run, not in the cwd
    assert not list(tmp_path.iterdir())
    assert f"replies to {out}" in capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    report = load_report(pipeline["run"])
    assert [line["id"] for line in lines] == [r["id"] for r in report["records"]]  # the eval split, in order
    for line in lines:
        assert set(line) == {"id", "task", "reply_with_latent", "reply_without_latent", "reference"}
        assert line["task"].startswith("You are in the middle of a room") and line["reference"]


def test_report_command_errors(pipeline, tmp_path, capsys):
    assert ev.main(["report", "--output_dir", str(tmp_path)]) == 2
    assert "not a trained output directory" in capsys.readouterr().err
    args = ["report", "--output_dir", pipeline["run"], "--data_path", str(tmp_path / "missing.json")]
    assert ev.main(args) == 2
    assert "--hf_hidden_repo" in capsys.readouterr().err
    assert ev.main(["nonsense"]) == 2


def test_report_command_defaults_to_the_runs_batches(pipeline, tmp_path):
    """Without --batch_size the command batches as training's evaluation did, so even the per-batch KL term
    equals training's eval_kl."""
    assert ev.main(["report", "--output_dir", pipeline["run"], "--report_dir", str(tmp_path)]) == 0
    with open(f"{pipeline['run']}/eval_results.json") as f:
        metrics = json.load(f)
    objective = load_report(tmp_path)["student_objective"]
    assert objective["kl"] == pytest.approx(metrics["eval_kl"], rel=1e-4, abs=1e-7)
    assert objective["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
