#!/usr/bin/env python
"""Build the data-latent dataset that `train_latent_comm.py --hf_hidden_repo` reads.

A reasoning model (an HF id or path, usually of the teacher's family: its hidden size must be the
teacher's) turns a plan for each conversation into last-layer hidden states `[L, H]`. Two modes:

- ``teacher-forced``: the plan text exists (a ``plan`` field of each record, or ``--plans_path``, a JSON
  object {id: plan}) and the model reads it. Which positions are kept depends on ``--plan_context``:
  ``plain`` (default) runs the model over the plan alone, tokenized with the tokenizer's default special
  tokens (``tokenizer(plan)``, e.g. a BOS for Llama, nothing for Qwen), and keeps every position of it;
  ``chat`` renders the planning prompt of ``generate`` mode in the chat template with the plan as the
  assistant's answer (the plan tokenized without special tokens right after the generation prompt) and
  keeps only the plan's positions, i.e. what ``generate`` mode would have stored had the model written
  that plan.
- ``generate``: the model writes the plan. The prompt ``--plan_prompt_template`` (with ``{task}``, the
  first user message) goes through the chat template with a generation prompt (plain text plus a newline
  when the tokenizer has no template); sampling with ``--temperature`` 0.7, ``--top_p`` 0.9, ``--top_k``
  50 (``--do_sample False`` for greedy), at most ``--max_plan_tokens`` new tokens. The stored hidden
  states are those of the generated tokens before the first EOS, from one teacher-forced forward over
  prompt + plan (the same numbers the model produced while generating, read in one batched pass).
  An empty plan (EOS first) keeps the EOS position, so every record gets at least one row.

Hidden states are the decoder's last-layer output after its final norm (``model.model(...)
.last_hidden_state`` for Qwen/Llama), the same tensor the training demo builds its data latents from.

Output: ``--output_dir``, a ``save_to_disk`` dataset with ``task_id`` (string), ``hidden_state``
(``Array2D`` ``[L, H]``, float32 or float16) and ``plan`` (string). Records are processed in shards of
``--shard_size``; each shard is written as an Arrow file under ``<output_dir>.partial/`` (to a temporary
name, renamed when complete), so host memory stays at one batch and a rerun of the same command after an
interruption skips the shards already written. When every shard is there, the dataset is assembled
(memory-mapped, no copy in RAM), saved, moved to ``--output_dir`` and the partial directory removed.
With sampling, shard i is seeded with ``--seed + i``: a resumed build writes what an uninterrupted one
would have.

Usage::

    python build_hidden_states.py --mode teacher-forced --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --data_path data/alfworld_sft.json --plans_path data/plans.json --output_dir data/alfworld_hidden
    python build_hidden_states.py --mode generate --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --data_path data/alfworld_sft.json --output_dir data/alfworld_hidden --max_plan_tokens 256

Data problems are found before any weights load and reported like training does (one ``error:`` line,
exit status 2); ``--skip_invalid_samples`` drops such records instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import train_latent_comm as tlc

logger = logging.getLogger(__name__)

DEFAULT_PLAN_PROMPT_TEMPLATE = "Please provide a general plan to solve this task.\n\nThe task is: {task}"
BUILD_CONFIG_NAME = "build_config.json"
MODES = ("teacher-forced", "generate")


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


@dataclass
class BuildArguments:
    _argument_group_name = "Build"
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reasoning model (HF id or path) whose last-layer hidden states are stored (required)."},
    )
    data_path: str | None = field(
        default=None, metadata={"help": "Conversations: JSON array or JSON Lines of {id, conversations} (required)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the `save_to_disk` dataset goes (required); must not exist yet."}
    )
    mode: str = field(
        default="teacher-forced",
        metadata={"help": "'teacher-forced' (read existing plans) or 'generate' (write plans).", "choices": MODES},
    )
    plans_path: str | None = field(
        default=None,
        metadata={"help": "teacher-forced: a JSON object {id: plan}; default: each record's 'plan' field."},
    )
    plan_context: str = field(
        default="plain",
        metadata={
            "help": "teacher-forced: 'plain' (the plan alone, every position kept) or 'chat' (the plan as the "
            "assistant's answer to the planning prompt in the chat template; only the plan's positions kept).",
            "choices": ["plain", "chat"],
        },
    )
    plan_prompt_template: str = field(
        default=DEFAULT_PLAN_PROMPT_TEMPLATE,
        metadata={"help": "Planning prompt; '{task}' is replaced by the first user message."},
    )
    max_plan_tokens: int = field(default=256, metadata={"help": "generate: at most this many plan tokens."})
    do_sample: bool = field(default=True, metadata={"help": "generate: sample (True) or decode greedily."})
    temperature: float = field(default=0.7, metadata={"help": "generate: sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "generate: nucleus sampling threshold."})
    top_k: int = field(default=50, metadata={"help": "generate: top-k sampling."})
    batch_size: int = field(default=8, metadata={"help": "Records per forward (and generate) call."})
    shard_size: int = field(
        default=256, metadata={"help": "Records per shard: the unit that is written at once and resumed."}
    )
    hidden_state_dtype: str = field(
        default="float32",
        metadata={
            "help": "Storage dtype of `hidden_state`: float32, or float16 for half the disk (Arrow and numpy "
            "have no bfloat16; float16 values beyond +-65504 are reported as invalid).",
            "choices": ["float32", "float16"],
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda when available, else cpu)."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel (default: flash_attention_2 when usable, else sdpa)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the model repository (opt-in)."}
    )
    max_length: int = field(
        default=4096, metadata={"help": "teacher-forced: plans (with their context) are cut to this many tokens."}
    )
    seed: int = field(default=42, metadata={"help": "Sampling seed (shard i uses seed + i)."})
    skip_invalid_samples: bool = field(
        default=False, metadata={"help": "Drop invalid records with a warning instead of stopping."}
    )


def parse_args(argv: Sequence[str] | None = None) -> BuildArguments:
    parser = tlc.ArgumentParser(BuildArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    except ValueError as err:
        raise tlc.LatentCommError(str(err).replace("\n", " ")) from None
    problems = [
        f"--{name} is required" for name in ("model_name_or_path", "data_path", "output_dir") if not getattr(args, name)
    ]
    if args.batch_size < 1 or args.shard_size < 1:
        problems.append("--batch_size and --shard_size must be at least 1")
    if args.max_plan_tokens < 1:
        problems.append("--max_plan_tokens must be at least 1")
    if args.mode == "generate" and "{task}" not in args.plan_prompt_template:
        problems.append("--plan_prompt_template must contain '{task}'")
    if args.mode == "generate" and args.plans_path:
        problems.append("--plans_path is for --mode teacher-forced (generate mode writes the plans)")
    if problems:
        raise tlc.LatentCommError("; ".join(problems))
    return args


# ----------------------------------------------------------------------------------------------------
# Records and plans: validated before any weights load
# ----------------------------------------------------------------------------------------------------


@dataclass
class PlanRecord:
    """One record to process: its id, its first user message and (teacher-forced) its plan."""

    id: str
    task: str
    plan: str | None


def load_plans(path: str) -> dict[str, str]:
    try:
        plans = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise tlc.LatentCommError(f"cannot read --plans_path {path}: {tlc._first_line(err)}") from None
    if not isinstance(plans, dict):
        raise tlc.LatentCommError(f"--plans_path {path} must hold a JSON object {{id: plan}}")
    return {str(k): v for k, v in plans.items()}


def collect_records(args: BuildArguments) -> list[PlanRecord]:
    """Check every record (training's rules, plus a plan in teacher-forced mode) and raise once."""
    problems = tlc.ProblemLog()
    raw = tlc.load_records(args.data_path)
    conversations = tlc.parse_conversations(raw, problems)
    plans = load_plans(args.plans_path) if args.plans_path else None
    plan_field = {str(r["id"]): r.get("plan") for r in raw if isinstance(r, dict) and "id" in r}
    records = []
    for conv in conversations:
        plan = None
        if args.mode == "teacher-forced":
            plan = plans.get(conv.id) if plans is not None else plan_field.get(conv.id)
            if not isinstance(plan, str) or not plan.strip():
                source = "--plans_path" if plans is not None else "its 'plan' field"
                problems.add(f"has no plan (a non-empty string in {source})", conv.id)
                continue
        records.append(PlanRecord(conv.id, conv.messages[conv.first_user_index][1], plan))
    tlc.raise_or_drop_invalid(problems, args.data_path, len(raw), len(records), args.skip_invalid_samples)
    return records


# ----------------------------------------------------------------------------------------------------
# Tokenization and hidden states
# ----------------------------------------------------------------------------------------------------


def planning_prompt_ids(tokenizer, task: str, template: str) -> list[int]:
    """The planning prompt in the chat template with a generation prompt (plain text + newline without one)."""
    prompt = template.replace("{task}", task)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + "\n")["input_ids"]


@torch.no_grad()
def last_hidden_states(model, sequences: list[list[int]], keep: list[tuple[int, int]], pad_id: int) -> list[np.ndarray]:
    """Run the decoder once over right-padded `sequences` and return rows `keep[i] = (start, end)` of each.

    Right padding with an explicit mask: causal attention never lets a real token see the padding after it.
    """
    device = next(model.parameters()).device
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = tlc._decoder_of(model)(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [B, T, H]
    return [hidden[b, start:end].float().cpu().numpy() for b, (start, end) in enumerate(keep)]


def teacher_forced_batch(model, tokenizer, batch: list[PlanRecord], args: BuildArguments, pad_id: int):
    """Hidden states of the given plans; returns (plans, hidden states)."""
    sequences, keep = [], []
    for record in batch:
        if args.plan_context == "chat":
            prompt = planning_prompt_ids(tokenizer, record.task, args.plan_prompt_template)
            plan_ids = tokenizer(record.plan, add_special_tokens=False)["input_ids"]
            seq = (prompt + plan_ids)[: args.max_length]
            start = min(len(prompt), len(seq) - 1)
        else:
            seq = tokenizer(record.plan)["input_ids"][: args.max_length]
            start = 0
        sequences.append(seq)
        keep.append((start, len(seq)))
    return [r.plan for r in batch], last_hidden_states(model, sequences, keep, pad_id)


@torch.no_grad()
def generate_batch(model, tokenizer, batch: list[PlanRecord], args: BuildArguments, pad_id: int):
    """Let the model write a plan per record (left-padded batch), then read the plan's hidden states."""
    device = next(model.parameters()).device
    prompts = [planning_prompt_ids(tokenizer, r.task, args.plan_prompt_template) for r in batch]
    length = max(len(p) for p in prompts)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[b, length - len(prompt) :] = 1
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.do_sample else {}
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=args.max_plan_tokens,
        do_sample=args.do_sample,
        pad_token_id=pad_id,
        **sampling,
    )
    generated = out[:, length:].tolist()
    eos_ids = _eos_ids(model, tokenizer)
    sequences, keep, plans = [], [], []
    for prompt, tokens in zip(prompts, generated):
        end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
        plan_tokens = tokens[: max(end, 1)]  # an empty plan keeps the EOS row, so L >= 1
        sequences.append(prompt + plan_tokens)
        keep.append((len(prompt), len(prompt) + len(plan_tokens)))
        plans.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
    return plans, last_hidden_states(model, sequences, keep, pad_id)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# ----------------------------------------------------------------------------------------------------
# Shards: written under <output_dir>.partial/, resumed, assembled
# ----------------------------------------------------------------------------------------------------


def _features(hidden_size: int, dtype: str):
    import datasets

    return datasets.Features(
        {
            "task_id": datasets.Value("string"),
            "hidden_state": datasets.Array2D(shape=(None, hidden_size), dtype=dtype),
            "plan": datasets.Value("string"),
        }
    )


def build_fingerprint(args: BuildArguments, records: list[PlanRecord]) -> dict:
    """What a partial build must share with this one to be resumed (not the batch size or device)."""
    content = dataclasses.asdict(args)
    for name in ("batch_size", "device", "output_dir", "attn_implementation", "skip_invalid_samples"):
        content.pop(name)
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.id, r.task, r.plan]).encode())
    content["records_sha256"] = digest.hexdigest()
    return content


def shard_path(partial_dir: Path, index: int) -> Path:
    return partial_dir / f"shard-{index:05d}.arrow"


def write_shard(path: Path, rows: dict[str, list], features) -> None:
    """Write one shard to a temporary name and rename it: a shard file that exists is complete."""
    from datasets.arrow_writer import ArrowWriter

    tmp = path.with_suffix(".arrow.tmp")
    writer = ArrowWriter(features=features, path=str(tmp))
    try:
        writer.write_batch(rows)
        writer.finalize()
    finally:
        writer.close()
    os.replace(tmp, path)


def assemble(partial_dir: Path, n_shards: int, output_dir: Path) -> None:
    """Concatenate the memory-mapped shards, save them as one dataset and move it into place."""
    import datasets

    shards = [datasets.Dataset.from_file(str(shard_path(partial_dir, i))) for i in range(n_shards)]
    dataset = datasets.concatenate_datasets(shards)
    final_tmp = partial_dir / "final"
    if final_tmp.exists():
        shutil.rmtree(final_tmp)
    dataset.save_to_disk(str(final_tmp))
    del dataset, shards
    os.replace(final_tmp, output_dir)
    shutil.rmtree(partial_dir)


def _torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def build(args: BuildArguments) -> str:
    """Validate, then process the records shard by shard; returns the output directory."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    output_dir = Path(args.output_dir)
    partial_dir = Path(str(output_dir).rstrip("/") + ".partial")
    if output_dir.exists():
        if partial_dir.is_dir() and not (partial_dir / "final").exists():
            # Killed after the finished dataset was moved into place, before the clean-up: it is complete.
            shutil.rmtree(partial_dir)
            return str(output_dir)
        raise tlc.LatentCommError(f"--output_dir {output_dir} exists: remove it or choose another directory")
    records = collect_records(args)
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except Exception as err:
        raise tlc.LatentCommError(f"cannot load {args.model_name_or_path}: {tlc._first_line(err)}") from None
    if args.mode == "generate" or args.plan_context == "chat":
        if not getattr(tokenizer, "chat_template", None):
            logger.warning("The tokenizer has no chat template: the planning prompt is plain text plus a newline.")
    hidden_size = tlc._hidden_size(config)

    fingerprint = build_fingerprint(args, records)
    config_file = partial_dir / BUILD_CONFIG_NAME
    if partial_dir.exists():
        saved = json.loads(config_file.read_text()) if config_file.is_file() else None
        if saved != fingerprint:
            raise tlc.LatentCommError(
                f"{partial_dir} holds a partial build with other settings or data: rerun with the same flags, or "
                "remove it to start over"
            )
    partial_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))

    n_shards = (len(records) + args.shard_size - 1) // args.shard_size
    todo = [i for i in range(n_shards) if not shard_path(partial_dir, i).is_file()]
    if todo:
        logger.info("%d records in %d shards; %d shard(s) to build.", len(records), n_shards, len(todo))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                args.model_name_or_path,
                dtype=_torch_dtype(args.dtype, device),
                attn_implementation=tlc.choose_attn_implementation(args.attn_implementation),
                trust_remote_code=args.trust_remote_code,
            )
        except (OSError, ValueError, ImportError) as err:
            raise tlc.LatentCommError(f"cannot load the model: {tlc._first_line(err)}") from None
        model.to(device).eval()
        pad_id = tlc._pad_id(tokenizer)
        features = _features(hidden_size, args.hidden_state_dtype)
        step = teacher_forced_batch if args.mode == "teacher-forced" else generate_batch
        done = (n_shards - len(todo)) * args.shard_size
        progress = tqdm(total=len(records), initial=min(done, len(records)), desc=f"Hidden states ({args.mode})")
        for index in todo:
            set_seed(args.seed + index)  # a resumed shard samples what it would have sampled
            shard = records[index * args.shard_size : (index + 1) * args.shard_size]
            rows = {"task_id": [], "hidden_state": [], "plan": []}
            for start in range(0, len(shard), args.batch_size):
                batch = shard[start : start + args.batch_size]
                plans, states = step(model, tokenizer, batch, args, pad_id)
                for record, plan, state in zip(batch, plans, states):
                    state = state.astype(args.hidden_state_dtype)
                    if not np.isfinite(state).all():
                        raise tlc.LatentCommError(
                            f"record {record.id}: non-finite hidden states (in {args.hidden_state_dtype}); "
                            "try --hidden_state_dtype float32 or --dtype float32"
                        )
                    rows["task_id"].append(record.id)
                    rows["hidden_state"].append(state)
                    rows["plan"].append(plan)
                progress.update(len(batch))
            write_shard(shard_path(partial_dir, index), rows, features)
        progress.close()
    else:
        logger.info("All %d shard(s) already built; assembling.", n_shards)
    assemble(partial_dir, n_shards, output_dir)
    logger.info("Wrote %d hidden states to %s.", len(records), output_dir)
    return str(output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    try:
        build(parse_args(argv))
    except tlc.LatentCommError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
