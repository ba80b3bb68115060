#!/usr/bin/env python
"""Evaluate a trained latent-communication run, and generate the teacher's replies with the latent.

Two subcommands over a trained ``output_dir`` of ``train_latent_comm.py`` (or one of its checkpoints):

``report``: on the run's held-out split (the same deterministic split as training, read from the run's
``run_args.json``) or on a given conversations file + hidden states, the frozen teacher's cross-entropy
and next-token accuracy on the assistant tokens under five conditions:

- ``no_latent``: no block at all (training's run B);
- ``data_latent``: the block holds the record's own data latent through the head (run D);
- ``student_latent``: the block holds the student's latent (run A, what the student learned);
- ``cross_task_latent``: another record's data latent (record i gets record i+1's, a derangement), which
  tells how much of ``data_latent``'s effect is specific to the task rather than generic;
- ``noise_latent``: Gaussian noise with the data latents' per-dimension mean and std (over every row
  the evaluated records feed the head), through the head; record i's noise is drawn with seed + i, the
  seed being the training run's ``--seed`` unless ``--seed`` is given, so that ``--report`` and this
  command give the same numbers at any batch size.

Each latent condition is also compared with ``data_latent``: ``kl_to_data_latent`` is training's KL term
(``T^2 KL(p_data || p_condition)`` at ``--kl_temperature`` over the first ``kl_window`` targets after the
block, uncertainty-weighted per batch exactly as in training) and ``cosine_to_data_latent`` is
``cos(mean_k Z, mean_k Zd)``. For ``student_latent`` these are training's ``kl`` and ``1 - align``.
Outputs ``latent_report.json``, ``latent_report.md`` (a table) and ``latent_report.png`` (each condition's
CE on an axis fitted to the values, with its value, its difference to ``no_latent`` and its accuracy; with
``trainer_state.json``, the loss and the CE, KL and Align curves on their own axes, the evaluation CE
without latent and with the data latent next to the student's).

``generate``: the student writes its latent for each conversation's first user message, and the teacher
generates the assistant reply with ``[<bop>, latent, <eop>]`` spliced right after that message (the
prompt is rendered and tokenized as in training: plain text, or the chat template with the assistant's
generation header after the block). Batched with left padding, greedy or sampled, optionally side by
side with the teacher's reply without latent (``--compare_no_latent``); one JSON line per record, into
``latent_replies.jsonl`` in the run's directory unless ``--output_file`` says otherwise.

Usage::

    python evaluate_latent.py report --output_dir latent_out
    python evaluate_latent.py report --output_dir latent_out --data_path test.json --hf_hidden_repo test_hidden
    python evaluate_latent.py generate --output_dir latent_out --max_new_tokens 128 --compare_no_latent

Training writes the same report into its output_dir with ``python train_latent_comm.py ... --report``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import train_latent_comm as tlc

logger = logging.getLogger(__name__)

CONDITIONS = ("no_latent", "data_latent", "student_latent", "cross_task_latent", "noise_latent")
REPORT_JSON, REPORT_MD, REPORT_PNG = tlc.REPORT_NAMES
# Curves of the Trainer's log drawn in the report: training terms and their evaluation counterparts.
CURVE_KEYS = (
    "loss", "ce", "kl", "align",
    "eval_loss", "eval_ce", "eval_kl", "eval_align", "eval_ce_no_latent", "eval_ce_data_latent",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


@dataclass
class RunArguments:
    _argument_group_name = "Trained run and data"
    output_dir: str | None = field(
        default=None, metadata={"help": "A trained output_dir (or checkpoint) of train_latent_comm.py (required)."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher's weights (default: the path recorded at training time)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Teacher dtype (default: as trained).",
            "choices": [None, "float32", "bfloat16", "float16"],
        },
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda when available, else cpu)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel (default sdpa)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code (opt-in)."})
    student_base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "LoRA runs: the student's base weights (default: the path recorded at training time)."},
    )
    data_path: str | None = field(
        default=None, metadata={"help": "Conversations to use (default: the training run's --data_path)."}
    )
    hf_hidden_repo: str | None = field(
        default=None, metadata={"help": "report: data latents (default: the training run's --hf_hidden_repo)."}
    )
    split: str = field(
        default="auto",
        metadata={
            "help": "Records used: 'eval' or 'train' (training's split of --data_path), 'all'. 'auto': eval for "
            "the run's own data, all for a file given with --data_path.",
            "choices": ["auto", "eval", "train", "all"],
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Records per batch (default: the run's --per_device_eval_batch_size, else 4; the report's KL "
            "normalises its uncertainty weights per batch, as training's evaluation does)."
        },
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the noise latents and of sampling (default: the training run's --seed, which "
            "`train_latent_comm.py --report` uses too, so both give the same noise_latent numbers)."
        },
    )


@dataclass
class ReportArguments(RunArguments):
    report_dir: str | None = field(default=None, metadata={"help": "Where the report goes (default: output_dir)."})


@dataclass
class GenerateArguments(RunArguments):
    output_file: str | None = field(
        default=None, metadata={"help": f"JSON Lines output (default: {tlc.REPLIES_NAME} in --output_dir)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum tokens of each reply."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of decoding greedily."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold (with --do_sample)."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling (with --do_sample)."})
    compare_no_latent: bool = field(default=False, metadata={"help": "Also generate each reply without latent."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N records."})


# ----------------------------------------------------------------------------------------------------
# Data: the run's split, or a given file (validated before weights load, as in training)
# ----------------------------------------------------------------------------------------------------


def read_run_args(output_dir: str) -> dict[str, Any]:
    """The training run's `run_args.json` (in output_dir, or its parent for a checkpoint); {} if absent."""
    for directory in (Path(output_dir), Path(output_dir).parent):
        path = directory / tlc.RUN_ARGS_NAME
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def resolve_batch_size(args: RunArguments) -> int:
    recorded = read_run_args(args.output_dir).get("LatentTrainingArguments", {})
    return args.batch_size or recorded.get("per_device_eval_batch_size") or 4


def resolve_seed(args: RunArguments) -> int:
    """--seed, else the training run's (as `--report` uses), else the training default."""
    if args.seed is not None:
        return args.seed
    return read_run_args(args.output_dir).get("LatentTrainingArguments", {}).get("seed", 42)


def resolve_data(args: RunArguments, need_hidden: bool = True) -> tuple[str, str | None, str, dict[str, Any]]:
    """(data_path, hf_hidden_repo, split, split settings) for the run's data or the given files."""
    recorded = read_run_args(args.output_dir)
    data_rec = recorded.get("DataArguments", {})
    train_rec = recorded.get("LatentTrainingArguments", {})
    data_path = args.data_path or data_rec.get("data_path")
    hidden = args.hf_hidden_repo or (data_rec.get("hf_hidden_repo") if not args.data_path else None)
    if not data_path:
        raise tlc.LatentCommError(
            f"{args.output_dir} records no --data_path (no {tlc.RUN_ARGS_NAME}): pass --data_path"
        )
    if need_hidden and not hidden:
        raise tlc.LatentCommError("pass --hf_hidden_repo with --data_path (the report needs the data latents)")
    # Runs record absolute local paths; older ones the path as given, read relative to the current directory.
    recorded_in = f"the run's, recorded in {Path(args.output_dir, tlc.RUN_ARGS_NAME)}"
    if not Path(data_path).is_file():
        where = "" if args.data_path else f" ({recorded_in})"
        raise tlc.LatentCommError(f"--data_path {data_path}{where}: no such file; pass --data_path")
    if hidden:
        problem = tlc.hub_or_local_problem("--hf_hidden_repo", hidden, "dataset", tuple(tlc.HIDDEN_FILE_BUILDERS))
        if problem:
            where = "" if args.hf_hidden_repo else f" ({recorded_in})"
            raise tlc.LatentCommError(f"{problem}{where}; pass --hf_hidden_repo")
    split = args.split if args.split != "auto" else ("all" if args.data_path else "eval")
    settings = {
        "eval_ratio": data_rec.get("eval_ratio", 0.05),
        "seed": train_rec.get("seed", 42),
        "skip_invalid_samples": data_rec.get("skip_invalid_samples", False),
    }
    return data_path, hidden, split, settings


def select_split(n: int, split: str, settings: dict[str, Any]) -> list[int]:
    if split == "all":
        return list(range(n))
    train_idx, eval_idx = tlc.split_train_eval(n, settings["eval_ratio"], settings["seed"])
    chosen = eval_idx if split == "eval" else train_idx
    if not chosen:
        raise tlc.LatentCommError(
            f"the run's --eval_ratio {settings['eval_ratio']} leaves no '{split}' records: pass --split train or all"
        )
    return chosen


def _data_arguments(config: dict[str, Any]) -> tlc.DataArguments:
    return tlc.DataArguments(
        conversation_format=config["conversation_format"],
        plan_prompt=config["plan_prompt"],
        model_max_length=config["model_max_length"],
        student_max_length=config["student_max_length"],
    )


def build_eval_dataset(
    config: dict[str, Any], teacher_tokenizer, student_tokenizer, data_path, hf_hidden_repo, split, settings
) -> tlc.LatentCommDataset:
    """Training's pipeline (parse, join with data latents, tokenize, split) over the chosen records."""
    problems = tlc.ProblemLog()
    records = tlc.load_records(data_path)
    conversations = tlc.parse_conversations(records, problems)
    store = tlc.HiddenStateStore(hf_hidden_repo)
    conversations = tlc.check_hidden_states(conversations, store, config["teacher_hidden_size"], problems)
    K = config["settings"]["K"]
    samples = tlc.encode_conversations(
        conversations, store, teacher_tokenizer, student_tokenizer, _data_arguments(config), K, problems
    )
    if problems:
        message = f"{data_path}: {len(problems.bad_ids())} of {len(records)} records are invalid: {problems.summary()}"
        if not settings["skip_invalid_samples"]:
            raise tlc.LatentCommError(message + ". Fix them (the training run skipped none).")
        logger.warning("Dropping invalid records, as the training run did. %s", message)
    if not samples:
        raise tlc.LatentCommError(f"{data_path}: no usable records")
    chosen = select_split(len(samples), split, settings)
    return tlc.LatentCommDataset([samples[i] for i in chosen], store, K)


def _load_tokenizers(output_dir: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not Path(output_dir, tlc.LATENT_CONFIG_NAME).is_file():
        raise tlc.LatentCommError(f"{output_dir} has no {tlc.LATENT_CONFIG_NAME}: not a trained output directory")
    tlc.refuse_head_stage_run(output_dir, json.loads(Path(output_dir, tlc.LATENT_CONFIG_NAME).read_text()))
    load = AutoTokenizer.from_pretrained
    teacher = load(os.path.join(output_dir, tlc.TEACHER_TOKENIZER_DIR), trust_remote_code=trust_remote_code)
    student = load(os.path.join(output_dir, tlc.STUDENT_DIR), trust_remote_code=trust_remote_code)
    return teacher, student


def _load_model(args: RunArguments):
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, run = tlc.load_latent_model(
        args.output_dir,
        args.teacher_model_name_or_path,
        dtype,
        args.attn_implementation,
        args.trust_remote_code,
        student_base_model_name_or_path=args.student_base_model_name_or_path,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), run


# ----------------------------------------------------------------------------------------------------
# The report: five conditions, teacher CE and accuracy on the assistant tokens
# ----------------------------------------------------------------------------------------------------


def chunked_nll_and_correct(
    hidden_rows: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """`-log p(target)` `[N]` and whether the teacher's most likely next token is the target `[N]`, from one
    `[chunk, V]` block of logits at a time (no gradient)."""
    step = tlc.rows_per_chunk(lm_head)
    nll, correct = [], []
    with torch.no_grad():
        for i in range(0, hidden_rows.shape[0], step):
            logits = lm_head(hidden_rows[i : i + step]).float()
            nll.append(torch.nn.functional.cross_entropy(logits, targets[i : i + step], reduction="none"))
            correct.append(logits.argmax(-1) == targets[i : i + step])
    if not nll:
        return hidden_rows.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool)
    return torch.cat(nll), torch.cat(correct)


def data_latent_moments(dataset: tlc.LatentCommDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std `[H]` over every data-latent row `X` of the dataset (read one at a time)."""
    total = total_sq = None
    count = 0
    for sample in dataset.samples:
        rows = dataset.store.latent_rows(sample.hidden_row, dataset.K).astype(np.float64)  # [K, H]
        total = rows.sum(0) if total is None else total + rows.sum(0)
        total_sq = (rows**2).sum(0) if total_sq is None else total_sq + (rows**2).sum(0)
        count += rows.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def cross_task_order(n: int) -> list[int]:
    """Record i borrows record (i + 1) mod n's data latent: no record keeps its own (n >= 2)."""
    return [(i + 1) % n for i in range(n)]


@torch.no_grad()
def compute_report(
    model: tlc.LatentCommModel,
    dataset: tlc.LatentCommDataset,
    collator: tlc.LatentCommCollator,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-condition CE, accuracy, KL and cosine to the data latent over `dataset` (no `[B, T, V]` logits).

    CE and accuracy are token-weighted over the whole set; KL and cosine are per-sample means, KL computed
    per batch as training's evaluation does (its uncertainty weights are normalised within a batch).
    """
    from tqdm.auto import tqdm

    cfg = model.settings
    device = next(model.teacher.parameters()).device
    lm_head = model.teacher.get_output_embeddings()
    n = len(dataset)
    conditions = [c for c in CONDITIONS if c != "cross_task_latent" or n >= 2]
    borrow = cross_task_order(n)
    noise_mean, noise_std = data_latent_moments(dataset)
    generator = torch.Generator()
    sums = {c: {"nll": 0.0, "correct": 0, "kl": 0.0, "cosine": 0.0} for c in conditions}
    n_targets, records = 0, []

    for start in tqdm(range(0, n, batch_size), desc="Latent report", disable=not progress):
        idx = list(range(start, min(start + batch_size, n)))
        batch = collator([dataset[i] for i in idx])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        labels, insert_pos, mask = batch["labels"], batch["insert_pos"], batch["attention_mask"]
        bsz = labels.shape[0]

        # Targets and the rows that predict them, as in LatentCommModel.forward.
        rows = tlc.LossRows.of(labels, insert_pos, cfg.K, cfg.kl_window)
        target_mask, spliced_pred = rows.target_mask, rows.spliced_pred
        tb, tt, wb, wt = rows.tb, rows.tt, rows.wb, rows.wt
        targets = labels[tb, tt]

        cross = torch.stack(
            [torch.from_numpy(dataset.store.latent_rows(dataset.samples[borrow[i]].hidden_row, cfg.K)) for i in idx]
        )
        # Record i's noise comes from seed + i: the same whatever the batching ([B, K, Ht]).
        noise = noise_mean + noise_std * torch.stack(
            [torch.randn((cfg.K, noise_mean.shape[0]), generator=generator.manual_seed(seed + i)) for i in idx]
        )
        zd = model.project_data_latents(batch["data_latents"])  # [B, K, Ht]
        blocks = {
            "data_latent": zd,
            "student_latent": model.project_student_latents(
                model.student_latents(batch["student_input_ids"], batch["student_attention_mask"])
            ),
            "cross_task_latent": model.project_data_latents(cross.to(device)),
            "noise_latent": model.project_data_latents(noise.to(device)),
        }

        target_rows, window_rows = {}, {}
        for condition in conditions:
            if condition == "no_latent":
                hidden = model.teacher_hidden(batch["input_ids"], mask)  # [B, T, Ht]
                target_rows[condition], window_rows[condition] = hidden[tb, tt - 1], hidden[wb, wt - 1]
            else:
                hidden = model.teacher_hidden(batch["input_ids"], mask, insert_pos, blocks[condition])
                target_rows[condition] = hidden[tb, spliced_pred[tb, tt]]
                window_rows[condition] = hidden[wb, spliced_pred[wb, wt]]
            del hidden

        weights = tlc.uncertainty_weights(
            tlc.chunked_entropy(window_rows["no_latent"], lm_head),
            tlc.chunked_entropy(window_rows["data_latent"], lm_head),
            cfg.uncertainty_quantile,
            cfg.kl_weighting,
        )
        per_record = {c: {} for c in conditions}
        for condition in conditions:
            nll, correct = chunked_nll_and_correct(target_rows[condition], targets, lm_head)  # [N], [N]
            kl_rows = tlc.chunked_kl(window_rows[condition], window_rows["data_latent"], lm_head, cfg.kl_temperature)
            kl = tlc.weighted_kl(kl_rows, weights).item()
            acc = sums[condition]
            acc["nll"] += nll.sum().item()
            acc["correct"] += int(correct.sum().item())
            acc["kl"] += kl * bsz
            if condition != "no_latent":
                cosine = 1 - tlc.alignment_per_sample(blocks[condition], zd)  # [B]
                acc["cosine"] += cosine.sum().item()
            per_record[condition] = nll.new_zeros(bsz).index_add_(0, tb, nll)
        counts = target_mask.sum(1)
        n_targets += int(counts.sum().item())
        for b, i in enumerate(idx):
            records.append(
                {
                    "id": dataset.samples[i].record_id,
                    "n_targets": int(counts[b]),
                    "ce": {c: per_record[c][b].item() / max(int(counts[b]), 1) for c in conditions},
                }
            )

    results = {}
    for condition in conditions:
        acc = sums[condition]
        ce = acc["nll"] / max(n_targets, 1)
        results[condition] = {
            "ce": ce,
            "perplexity": float(np.exp(min(ce, 50.0))),
            "accuracy": acc["correct"] / max(n_targets, 1),
            "kl_to_data_latent": acc["kl"] / n,
            "cosine_to_data_latent": None if condition == "no_latent" else acc["cosine"] / n,
        }
    student = results["student_latent"]
    align = 1 - student["cosine_to_data_latent"]
    return {
        "n_records": n,
        "n_targets": n_targets,
        "K": cfg.K,
        "kl_temperature": cfg.kl_temperature,
        "kl_window": cfg.kl_window,
        "conditions": results,
        "student_objective": {
            "ce": student["ce"],
            "kl": student["kl_to_data_latent"],
            "align": align,
            "loss": cfg.ce_weight * student["ce"]
            + cfg.kl_weight * student["kl_to_data_latent"]
            + cfg.align_weight * align,
        },
        "records": records,
    }


# ----------------------------------------------------------------------------------------------------
# Writing the report: JSON, Markdown, PNG
# ----------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "# Latent report",
        "",
        f"Run `{report.get('output_dir', '')}`, {report.get('split', '')} split: {report['n_records']} records, "
        f"{report['n_targets']} assistant tokens, K={report['K']}.",
        "",
        "| condition | CE | perplexity | next-token accuracy | KL to data latent | cosine to data latent |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in report["conditions"].items():
        lines.append(
            f"| {name} | {_fmt(r['ce'])} | {_fmt(r['perplexity'], 2)} | {_fmt(r['accuracy'])} | "
            f"{_fmt(r['kl_to_data_latent'])} | {_fmt(r['cosine_to_data_latent'])} |"
        )
    c = report["conditions"]
    lines += [
        "",
        f"CE gain of the student latent over no latent: {c['no_latent']['ce'] - c['student_latent']['ce']:+.4f} nats/token.",
    ]
    if "cross_task_latent" in c:
        lines.append(
            f"CE gain of the record's own data latent over another record's: "
            f"{c['cross_task_latent']['ce'] - c['data_latent']['ce']:+.4f} nats/token."
        )
    o = report["student_objective"]
    lines += ["", f"Training objective terms of the student latent: ce {o['ce']:.4f}, kl {o['kl']:.4f}, "
              f"align {o['align']:.4f}, loss {o['loss']:.4f}.", ""]  # fmt: skip
    return "\n".join(lines)


def training_curves(log_history: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """`{name: (steps, values)}` for each of CURVE_KEYS that the Trainer's log holds."""
    curves = {}
    for key in CURVE_KEYS:
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if points:
            curves[key] = ([p[0] for p in points], [p[1] for p in points])
    return curves


# One colour per condition, shared by the condition panel and the curves that measure the same run.
CONDITION_COLOURS = {
    "no_latent": "#7f7f7f",
    "data_latent": "#1f77b4",
    "student_latent": "#ff7f0e",
    "cross_task_latent": "#2ca02c",
    "noise_latent": "#d62728",
}
# Panels of training curves: (title, y label, [(log key, label, colour, line style, marker)]).
CURVE_PANELS = (
    ("Loss (CE, KL and Align, weighted)", "loss", [
        ("loss", "train", "#ff7f0e", "-", None), ("eval_loss", "eval", "#a04000", "-", "o")]),
    ("Teacher CE", "nats / token", [
        ("ce", "train (student latent)", "#ff7f0e", "-", None),
        ("eval_ce", "eval (student latent)", "#a04000", "-", "o"),
        ("eval_ce_no_latent", "eval, no latent", "#7f7f7f", "--", "s"),
        ("eval_ce_data_latent", "eval, data latent", "#1f77b4", "--", "^")]),
    ("KL to the data-latent run", "T^2 KL (nats)", [
        ("kl", "train", "#ff7f0e", "-", None), ("eval_kl", "eval", "#a04000", "-", "o")]),
    ("Align", "1 - cos(mean latents)", [
        ("align", "train", "#ff7f0e", "-", None), ("eval_align", "eval", "#a04000", "-", "o")]),
)  # fmt: skip


def _plot_conditions(ax, report: dict[str, Any]) -> None:
    """Teacher CE per condition as dots on an axis fitted to the values (0.1-nat gaps stay visible), each
    labelled with its CE, its change against no_latent (the dashed line, drawn as the stem) and its accuracy."""
    conditions = report["conditions"]
    names = list(conditions)[::-1]  # top to bottom in table order
    ces = [conditions[n]["ce"] for n in names]
    baseline = conditions["no_latent"]["ce"] if "no_latent" in conditions else None
    low, high = min(ces), max(ces)
    margin = max(high - low, 0.02 * max(abs(high), 1e-3))
    for y, (name, ce) in enumerate(zip(names, ces)):
        colour = CONDITION_COLOURS.get(name, "black")
        label = f"{ce:.4f}"
        if baseline is not None and name != "no_latent":
            ax.plot([baseline, ce], [y, y], color=colour, alpha=0.35, linewidth=3)
            label += f"  ({ce - baseline:+.4f})"
        ax.plot(ce, y, "o", color=colour, markersize=9, zorder=3)
        label += f"  acc {conditions[name]['accuracy']:.3f}"
        ax.annotate(label, (ce, y), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=9)
    if baseline is not None:
        ax.axvline(baseline, color=CONDITION_COLOURS["no_latent"], linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.5, len(names) - 0.3)
    ax.set_xlim(low - 0.25 * margin, high + 0.25 * margin)
    ax.set_xlabel("teacher CE on the assistant tokens (nats / token; lower is better; in brackets: against no_latent)")
    ax.grid(axis="x", alpha=0.3)
    where = f"{report['split']} split, " if report.get("split") else ""
    ax.set_title(
        f"Conditions: {where}{report['n_records']} records, {report['n_targets']} tokens, K={report['K']}",
        fontsize=10,
    )


def _plot_curves(ax, curves, title: str, ylabel: str, series) -> None:
    from matplotlib.ticker import MaxNLocator

    for key, label, colour, style, marker in series:
        if key in curves:
            steps, values = curves[key]
            ax.plot(steps, values, color=colour, linestyle=style, marker=marker, markersize=4, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_report(report: dict[str, Any], path: str, log_history: list[dict[str, Any]] | None = None) -> None:
    import matplotlib.pyplot as plt

    fig = report_figure(report, log_history)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_figure(report: dict[str, Any], log_history: list[dict[str, Any]] | None = None):
    """The conditions panel, and, with a training log, the loss and each term's train and eval curves."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves = training_curves(log_history or [])
    if not curves:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        _plot_conditions(ax, report)
    else:
        fig = plt.figure(figsize=(15, 8.5))
        grid = fig.add_gridspec(2, 3, height_ratios=(1, 1.1))
        _plot_conditions(fig.add_subplot(grid[0, :2]), report)
        axes = [fig.add_subplot(grid[0, 2])] + [fig.add_subplot(grid[1, i]) for i in range(3)]
        for ax, (title, ylabel, series) in zip(axes, CURVE_PANELS):
            _plot_curves(ax, curves, title, ylabel, series)
    fig.suptitle(f"Latent report: {report.get('output_dir', '')}", fontsize=11)
    fig.tight_layout()
    return fig


def write_report(report: dict[str, Any], report_dir: str, log_history: list[dict[str, Any]] | None = None) -> dict:
    """Write latent_report.json, .md and .png into `report_dir`; returns their paths."""
    os.makedirs(report_dir, exist_ok=True)
    paths = {
        kind: os.path.join(report_dir, name)
        for kind, name in (("json", REPORT_JSON), ("md", REPORT_MD), ("png", REPORT_PNG))
    }
    Path(paths["json"]).write_text(json.dumps(report, indent=2))
    Path(paths["md"]).write_text(markdown_table(report))
    plot_report(report, paths["png"], log_history)
    return paths


def _log_history(output_dir: str) -> list[dict[str, Any]]:
    path = Path(output_dir, "trainer_state.json")
    return json.loads(path.read_text()).get("log_history", []) if path.is_file() else []


def report_from_trainer(trainer) -> dict | None:
    """`--report` of the training script: the report on the trainer's eval set (its train set when there is
    none) with the final (best) model, written into output_dir. Call on the main process only."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled():
        logger.warning("--report is skipped under ZeRO-3; run `python evaluate_latent.py report` on the output_dir.")
        return None
    dataset, split = (
        (trainer.eval_dataset, "eval") if trainer.eval_dataset is not None else (trainer.train_dataset, "train")
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    try:
        with trainer.compute_loss_context_manager():
            report = compute_report(
                model, dataset, trainer.data_collator, trainer.args.per_device_eval_batch_size, trainer.args.seed
            )
    finally:
        model.train(was_training)
    report = {"output_dir": os.path.abspath(trainer.args.output_dir), "split": split, **report}
    paths = write_report(report, trainer.args.output_dir, trainer.state.log_history)
    logger.info("Latent report written to %s.\n%s", paths["md"], markdown_table(report))
    return report


def run_report(args: ReportArguments) -> dict:
    teacher_tokenizer, student_tokenizer = _load_tokenizers(args.output_dir, args.trust_remote_code)
    config = json.loads(Path(args.output_dir, tlc.LATENT_CONFIG_NAME).read_text())
    data_path, hidden, split, settings = resolve_data(args)
    dataset = build_eval_dataset(config, teacher_tokenizer, student_tokenizer, data_path, hidden, split, settings)
    model, run = _load_model(args)
    collator = tlc.LatentCommCollator(tlc._pad_id(run.teacher_tokenizer), tlc._pad_id(run.student_tokenizer))
    report = compute_report(model, dataset, collator, resolve_batch_size(args), resolve_seed(args))
    report = {
        "output_dir": os.path.abspath(args.output_dir),
        "split": split,
        "data_path": data_path,
        "hf_hidden_repo": hidden,
        **report,
    }
    report_dir = args.report_dir or args.output_dir
    paths = write_report(report, report_dir, _log_history(args.output_dir))
    print(markdown_table(report))
    print("Report: " + ", ".join(os.path.abspath(paths[kind]) for kind in ("json", "md", "png")), flush=True)
    return report


# ----------------------------------------------------------------------------------------------------
# Generation with the latent
# ----------------------------------------------------------------------------------------------------


def teacher_prompt_ids(conv: tlc.Conversation, tokenizer, fmt: str) -> tuple[list[int], list[int]]:
    """Teacher tokens before the block (everything up to the first user message, as training renders it)
    and after it (chat format: the assistant's generation header; plain: nothing)."""
    head = tlc.Conversation(conv.id, conv.messages[: conv.first_user_index + 1])
    pieces, _ = tlc.teacher_pieces(head, tokenizer, fmt)
    texts = [text for text, _ in pieces]
    before = [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]
    after: list[int] = []
    if fmt == "chat":
        rendered = tlc._render_chat(tokenizer, head.messages)
        header = tlc._render_chat(tokenizer, head.messages, add_generation_prompt=True)[len(rendered) :]
        after = tokenizer(header, add_special_tokens=False)["input_ids"]
    return before, after


def student_prompt_ids(conv: tlc.Conversation, tokenizer, config: dict[str, Any]) -> list[int]:
    """The student's input, built and cut as in training (`encode_conversation`)."""
    prefix, body = tlc.student_prompt_text(conv, tokenizer, config["conversation_format"], config["plan_prompt"])
    ids = tokenizer(prefix + body)["input_ids"]
    if len(ids) > config["student_max_length"]:
        prefix_ids = tokenizer(prefix)["input_ids"]
        body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        ids = prefix_ids + body_ids[-max(config["student_max_length"] - len(prefix_ids), 1) :]
    return ids


def _left_pad(sequences: list[torch.Tensor], pad_value) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `[L_i, ...]` tensors into `[B, L_max, ...]` with padding on the left, plus the `[B, L_max]` mask."""
    length = max(s.shape[0] for s in sequences)
    out = sequences[0].new_full((len(sequences), length, *sequences[0].shape[1:]), pad_value)
    mask = torch.zeros((len(sequences), length), dtype=torch.long, device=sequences[0].device)
    for b, s in enumerate(sequences):
        out[b, length - s.shape[0] :] = s
        mask[b, length - s.shape[0] :] = 1
    return out, mask


@torch.no_grad()
def generate_with_latent(
    model: tlc.LatentCommModel,
    run: tlc.LatentRun,
    conversations: Sequence[tlc.Conversation],
    use_latent: bool = True,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    batch_size: int = 4,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The teacher's reply to each conversation's first user message, with the student's latent block
    spliced right after that message (`use_latent=False`: the plain teacher). Returns one dict per
    conversation: `id`, `text` and `token_ids` (up to, not including, the first EOS).

    The spliced prompts are built as embeddings and left-padded, so `teacher.generate(inputs_embeds=...,
    attention_mask=...)` derives position ids that count real tokens only: each sample generates what it
    would generate alone.
    """
    from tqdm.auto import tqdm

    teacher, tokenizer = model.teacher, run.teacher_tokenizer
    fmt = run.config["conversation_format"]
    device = next(teacher.parameters()).device
    embed = teacher.get_input_embeddings()
    eos_id = tokenizer.eos_token_id
    pad_id = tlc._pad_id(tokenizer)
    student_pad = tlc._pad_id(run.student_tokenizer)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    results = []
    for start in tqdm(range(0, len(conversations), batch_size), desc="Generating", disable=not progress):
        batch = conversations[start : start + batch_size]
        prompts = [teacher_prompt_ids(conv, tokenizer, fmt) for conv in batch]
        if use_latent:
            student_ids = [torch.tensor(student_prompt_ids(c, run.student_tokenizer, run.config)) for c in batch]
            ids, mask = _left_pad(student_ids, student_pad)
            latents = model.project_student_latents(model.student_latents(ids.to(device), mask.to(device)))
            markers = embed(torch.tensor([model.settings.bop_id, model.settings.eop_id], device=device))
        sequences = []
        for b, (before, after) in enumerate(prompts):
            parts = [embed(torch.tensor(before, dtype=torch.long, device=device))]
            if use_latent:
                parts += [markers[:1], latents[b].to(markers.dtype), markers[1:]]  # [<bop>, K latents, <eop>]
            parts.append(embed(torch.tensor(after, dtype=torch.long, device=device)))
            sequences.append(torch.cat(parts))  # [L_b, Ht]
        inputs_embeds, attention_mask = _left_pad(sequences, 0.0)
        out = teacher.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **sampling,
        )  # [B, new tokens]: with inputs_embeds only, generate returns the new tokens
        for conv, tokens in zip(batch, out.tolist()):
            end = tokens.index(eos_id) if eos_id in tokens else len(tokens)
            results.append(
                {
                    "id": conv.id,
                    "text": tokenizer.decode(tokens[:end], skip_special_tokens=True),
                    "token_ids": tokens[:end],
                }
            )
    return results


def load_generation_conversations(args: GenerateArguments) -> list[tlc.Conversation]:
    """The records to reply to. A record needs no assistant turn here (one is the reference when present)."""
    data_path, hidden, split, settings = resolve_data(args, need_hidden=False)
    raw = tlc.load_records(data_path)
    completed = []
    for record in raw:
        # Records without a reply are valid input for generation: a placeholder satisfies the parser.
        key = "conversations" if isinstance(record, dict) and "conversations" in record else "messages"
        if isinstance(record, dict) and isinstance(record.get(key), list):
            turns = record[key]
            roles = [
                tlc.ROLE_ALIASES.get(str(t.get("from", t.get("role", ""))).strip().lower())
                if isinstance(t, dict)
                else None
                for t in turns
            ]
            if "user" in roles and "assistant" not in roles[roles.index("user") + 1 :]:
                record = {**record, key: turns + [{"from": "gpt", "value": ""}]}  # each message has its own layout
        completed.append(record)
    problems = tlc.ProblemLog()
    conversations = tlc.parse_conversations(completed, problems)
    if problems:
        raise tlc.LatentCommError(
            f"{data_path}: {len(problems.bad_ids())} of {len(raw)} records are invalid: {problems.summary()}"
        )
    if split != "all":
        # Training splits its usable samples (joined with data latents, tokenized): rebuild them to pick the ids.
        if not hidden:
            raise tlc.LatentCommError(f"--split {split} needs --hf_hidden_repo (or the run's own data)")
        teacher_tokenizer, student_tokenizer = _load_tokenizers(args.output_dir, args.trust_remote_code)
        config = json.loads(Path(args.output_dir, tlc.LATENT_CONFIG_NAME).read_text())
        dataset = build_eval_dataset(config, teacher_tokenizer, student_tokenizer, data_path, hidden, split, settings)
        keep = {sample.record_id for sample in dataset.samples}
        conversations = [conv for conv in conversations if conv.id in keep]
    return conversations[: args.limit] if args.limit else conversations


def run_generate(args: GenerateArguments) -> str:
    if not Path(args.output_dir, tlc.LATENT_CONFIG_NAME).is_file():
        raise tlc.LatentCommError(f"{args.output_dir} has no {tlc.LATENT_CONFIG_NAME}: not a trained output directory")
    conversations = load_generation_conversations(args)
    model, run = _load_model(args)
    common = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        batch_size=resolve_batch_size(args),
        progress=True,
    )
    torch.manual_seed(resolve_seed(args))
    with_latent = generate_with_latent(model, run, conversations, use_latent=True, **common)
    without = (
        generate_with_latent(model, run, conversations, use_latent=False, **common) if args.compare_no_latent else None
    )
    output_file = args.output_file or os.path.join(args.output_dir, tlc.REPLIES_NAME)
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as f:
        for i, conv in enumerate(conversations):
            first_user = conv.first_user_index
            reference = next((text for role, text in conv.messages[first_user + 1 :] if role == "assistant"), None)
            line = {"id": conv.id, "task": conv.messages[first_user][1], "reply_with_latent": with_latent[i]["text"]}
            if without is not None:
                line["reply_without_latent"] = without[i]["text"]
            line["reference"] = reference or None
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"Wrote {len(conversations)} replies to {os.path.abspath(output_file)}", flush=True)
    return output_file


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

COMMANDS = {"report": (ReportArguments, run_report), "generate": (GenerateArguments, run_generate)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: evaluate_latent.py {{{','.join(COMMANDS)}}} --output_dir RUN [flags] (--help per command)",
            file=sys.stderr,
        )
        return 2
    arg_class, command = COMMANDS[argv[0]]
    try:
        try:
            (args,) = tlc.ArgumentParser(arg_class).parse_args_into_dataclasses(args=argv[1:])
        except ValueError as err:
            raise tlc.LatentCommError(str(err).replace("\n", " ")) from None
        if not args.output_dir:
            raise tlc.LatentCommError("--output_dir (a trained run) is required")
        command(args)
    except tlc.LatentCommError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
