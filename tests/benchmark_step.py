"""Benchmark: one latent-communication training step against a plain teacher SFT step, side by side.

    python tests/benchmark_step.py                      # CPU-sized models, K in {8, 32, 128}, batch {1, 4}
    python tests/benchmark_step.py --json bench.json    # also write the table as JSON records
    python tests/benchmark_step.py --preset qwen2.5-7b+0.5b --device cuda --dtype bf16 --Ks 128 --batches 1 \
        --seq_len 4096 --gradient_checkpointing

Both steps run on the same random-weight models (Qwen2 architecture, built from a config: nothing is
downloaded) and the same spliced batch:

- full step: `LatentCommModel.forward` (student rollout, runs D and B without gradient, run A with a
  backward to its inputs), backward, AdamW step on the trained parts;
- teacher SFT step: the teacher alone over the spliced sequence (`[<bop>, K rows, <eop>]` included), CE
  on the same target rows (vocabulary logits at those rows only, as in the full step), backward with
  gradients for every teacher weight. This is the cost floor of training the teacher itself once;
- rollout: the student's prefill and K latent steps plus the head, forward and backward, timed alone; its
  share is `rollout_s / step_s`.

Each (K, batch) pair runs in fresh subprocesses, one for the full step (and the rollout) and one for the
SFT step, so that each peak memory is its own: peak RSS on a CPU, `torch.cuda.max_memory_allocated` on
a GPU. Times are medians over `--iters` steps after `--warmup` steps. Absolute times drift on shared
machines; the ratios, measured side by side, are what to compare. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Model shapes: (hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings).
PRESETS = {
    "cpu": {
        "teacher": (512, 1536, 8, 8, 2, 32000, False),
        "student": (256, 768, 4, 4, 2, 32000, True),
    },
    "qwen2.5-7b+0.5b": {  # the shapes of Qwen2.5-7B-Instruct and Qwen2.5-0.5B
        "teacher": (3584, 18944, 28, 28, 4, 152064, False),
        "student": (896, 4864, 24, 14, 2, 151936, True),
    },
}
# Dense bf16 peak of the GPUs this was run on, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def qwen2_config(shape, attn_implementation):
    from transformers import Qwen2Config

    hidden, intermediate, layers, heads, kv_heads, vocab, tied = shape
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=32768,
        attn_implementation=attn_implementation,
    )


def body_params(shape) -> int:
    """Parameters that every token goes through (no embedding table, no vocabulary head)."""
    hidden, intermediate, layers, heads, kv_heads, _, _ = shape
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2
    return layers * (attention + 3 * hidden * intermediate)


def build(args, K: int):
    """The models (random weights) and one spliced batch."""
    import torch
    from transformers import AutoModelForCausalLM

    import train_latent_comm as tlc

    torch.manual_seed(0)
    device = torch.device(args.device)
    shapes = PRESETS[args.preset]
    teacher_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(qwen2_config(shapes["teacher"], args.attn), dtype=teacher_dtype)
        student = AutoModelForCausalLM.from_config(qwen2_config(shapes["student"], args.attn), dtype=torch.float32)
    vocab = shapes["teacher"][5]
    settings = tlc.LatentSettings(K=K, bop_id=vocab - 2, eop_id=vocab - 1)
    model = tlc.LatentCommModel(teacher, student, settings, head_num_heads=8, head_dropout=0.1).to(device)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()

    B, T, S = args.batch, args.seq_len, args.student_len
    g = torch.Generator().manual_seed(1)
    insert_pos = min(args.insert_pos, T // 4)
    labels = torch.full((B, T), tlc.IGNORE_INDEX)
    positions = torch.arange(T)
    # Assistant turns: alternate 48 supervised tokens with 48 observation tokens after the first human turn.
    supervised = (positions >= insert_pos + 16) & (((positions - insert_pos) // 48) % 2 == 0)
    input_ids = torch.randint(0, vocab - 3, (B, T), generator=g)
    labels[:, supervised] = input_ids[:, supervised]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "labels": labels,
        "insert_pos": torch.full((B,), insert_pos),
        "student_input_ids": torch.randint(0, shapes["student"][5], (B, S), generator=g),
        "student_attention_mask": torch.ones(B, S, dtype=torch.long),
        "data_latents": torch.randn(B, K, shapes["teacher"][0], generator=g),
    }
    return model, {k: v.to(device) for k, v in batch.items()}


def timed(fn, args) -> float:
    import torch

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(args):
    import contextlib

    import torch

    if args.dtype == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_mb(args) -> float:
    import torch

    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker_full(args, K: int) -> dict:
    import torch

    model, batch = build(args, K)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with autocast(args):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def rollout():
        with autocast(args):
            latents = model.project_student_latents(
                model.student_latents(batch["student_input_ids"], batch["student_attention_mask"])
            )
        latents.float().square().mean().backward()
        optimizer.zero_grad(set_to_none=True)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(step, args)
    memory = peak_mb(args)
    return {"step_s": step_s, "rollout_s": timed(rollout, args), "peak_mb": memory}


def worker_sft(args, K: int) -> dict:
    import torch

    import train_latent_comm as tlc

    model, batch = build(args, K)
    teacher = model.teacher
    teacher.requires_grad_(True)
    lm_head = teacher.get_output_embeddings()
    labels, insert_pos = batch["labels"], batch["insert_pos"]
    rows = tlc.LossRows.of(labels, insert_pos, K, model.settings.kl_window)  # the full step's CE rows
    tb, tt = rows.tb, rows.tt
    spliced_pred = rows.spliced_pred[tb, tt]
    block = torch.randn(labels.shape[0], K, tlc._hidden_size(teacher.config), device=labels.device)

    def step():
        with autocast(args):
            hidden = model.teacher_hidden(batch["input_ids"], batch["attention_mask"], insert_pos, block)
            loss = tlc.chunked_nll(hidden[tb, spliced_pred], labels[tb, tt], lm_head).mean()
        loss.backward()
        teacher.zero_grad(set_to_none=True)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {"teacher_sft_s": timed(step, args), "teacher_sft_peak_mb": peak_mb(args)}


def flops(args, K: int, B: int) -> tuple[float, float]:
    """Model FLOPs of one full step and one SFT step (2 per parameter and token forward, 4 backward; the
    attention's own quadratic term and the vocabulary head outside the target rows are left out)."""
    shapes = PRESETS[args.preset]
    teacher, student = body_params(shapes["teacher"]), body_params(shapes["student"])
    T, S = args.seq_len, args.student_len
    spliced = T + K + 2
    # Runs D and B forward; run A forward and backward to its inputs only (about one more forward).
    full = 2 * teacher * B * (spliced + T + 2 * spliced) + 6 * student * B * (S + K)
    sft = 6 * teacher * B * spliced
    return full, sft


def run_worker(args, kind: str, K: int, batch: int) -> dict:
    command = [sys.executable, __file__, "--_worker", kind, "--_K", str(K), "--_batch", str(batch)]
    for name in ("preset", "device", "dtype", "attn", "seq_len", "student_len", "insert_pos", "iters", "warmup"):
        command += [f"--{name}", str(getattr(args, name))]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{kind} K={K} batch={batch} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="model shapes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: teacher in bf16, autocast")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, flash_attention_2, eager)")
    parser.add_argument("--Ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq_len", type=int, default=512, help="teacher tokens per sample (before splicing)")
    parser.add_argument("--student_len", type=int, default=128, help="student prompt tokens")
    parser.add_argument("--insert_pos", type=int, default=96, help="where the block goes (end of first turn)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--gpu_name", default=None, help="for MFU: H100, H200 or A100 (default: detected)")
    parser.add_argument("--json", default=None, help="also write the table here as a list of records")
    parser.add_argument("--_worker", choices=["full", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--_K", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        args.batch = args._batch
        result = (worker_full if args._worker == "full" else worker_sft)(args, args._K)
        print(json.dumps(result))
        return 0

    import torch

    peak_flops = None
    if args.device == "cuda":
        name = args.gpu_name or next((n for n in PEAK_FLOPS if n in torch.cuda.get_device_name()), None)
        peak_flops = PEAK_FLOPS.get(name)
        machine = torch.cuda.get_device_name()
    else:
        machine = f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"{args.preset} shapes on {machine}; {args.dtype}, {args.attn}, {args.seq_len} tokens, "
          f"student prompt {args.student_len}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"median of {args.iters} after {args.warmup} warm-up", flush=True)  # fmt: skip
    header = ["K", "batch", "step_s", "teacher_sft_s", "ratio", "rollout_share", "tokens_per_s", "peak_mb",
              "teacher_sft_peak_mb"] + (["mfu"] if peak_flops else [])  # fmt: skip
    print(" | ".join(header), flush=True)
    records = []
    for K in args.Ks:
        for batch in args.batches:
            full = run_worker(args, "full", K, batch)
            sft = run_worker(args, "sft", K, batch)
            record = {
                "K": K,
                "batch": batch,
                "step_s": round(full["step_s"], 4),
                "teacher_sft_s": round(sft["teacher_sft_s"], 4),
                "ratio": round(full["step_s"] / sft["teacher_sft_s"], 3),
                "rollout_share": round(full["rollout_s"] / full["step_s"], 3),
                "tokens_per_s": round(batch * args.seq_len / full["step_s"], 1),
                "peak_mb": round(full["peak_mb"], 1),
                "teacher_sft_peak_mb": round(sft["teacher_sft_peak_mb"], 1),
            }
            if peak_flops:
                record["mfu"] = round(flops(args, K, batch)[0] / full["step_s"] / peak_flops, 4)
                record["teacher_sft_mfu"] = round(flops(args, K, batch)[1] / sft["teacher_sft_s"] / peak_flops, 4)
            records.append(record)
            print(" | ".join(str(record[h]) for h in header), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
