"""Benchmark: one latent-communication training step against a plain teacher SFT step, side by side.

    python tests/benchmark_step.py                      # CPU-sized models, K in {8, 32, 128}, batch {1, 4}
    python tests/benchmark_step.py --preset ref-tiny    # the small reference shapes of the lean-rollout work
    python tests/benchmark_step.py --json bench.json    # also write the table as JSON records
    python tests/benchmark_step.py --ops                # aten operations per latent step, both rollouts
    python tests/benchmark_step.py --preset qwen2.5-7b+0.5b --device cuda --dtype bf16 --Ks 128 --batches 1 \
        --gradient_checkpointing

Both steps run on the same random-weight models (Qwen2 architecture, built from a config: nothing is
downloaded) and the same spliced batch:

- full step: `LatentCommModel.forward` (student rollout, runs D and B without gradient, run A with a
  backward to its inputs), backward, AdamW step on the trained parts;
- teacher SFT step: the teacher alone over the spliced sequence (`[<bop>, K rows, <eop>]` included), CE
  on the same target rows (vocabulary logits at those rows only, as in the full step), backward with
  gradients for every teacher weight. This is the cost floor of training the teacher itself once;
- rollout: the student's prefill and K latent steps plus the head, forward and backward, timed alone; its
  share is `rollout_s / step_s`.

The full step runs once per `--rollout_impls` value (`hf`: the student's HF decoder modules, `lean`: the lean
latent step), so the two rollouts are compared side by side against the same SFT step. Each (K, batch,
rollout) runs in a fresh subprocess, and so does the SFT step, so that each peak memory is its own: peak
RSS on a CPU, `torch.cuda.max_memory_allocated` on a GPU. Times are medians over `--iters` steps after
`--warmup` steps. Absolute times drift on shared machines; the ratios, measured side by side, are what to
compare.

`--ops` counts the aten operations that one latent step dispatches (a `TorchDispatchMode` around the
rollout and around its backward; K=8 minus K=4, divided by 4), forward and backward, in total and per
layer, for the preset's student and the Qwen2.5-0.5B student shape, batch 1, a 16-token prompt, both
rollouts. On a GPU each operation is a kernel launch (views excepted), which is what bounds the rollout
there. Not collected by pytest.
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

# Model shapes: (hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings), and the batch:
# teacher tokens, student prompt tokens, where the latent block goes, and which tokens after it are supervised
# ("alternating": 48 supervised, 48 not, as multi-turn replies and observations; "all").
PRESETS = {
    "cpu": {
        "teacher": (512, 1536, 8, 8, 2, 32000, False),
        "student": (256, 768, 4, 4, 2, 32000, True),
        "batch": dict(seq_len=512, student_len=128, insert_pos=96, reply="alternating"),
    },
    "ref-tiny": {  # a 128-token first turn, 128 supervised reply tokens; the student reads the plan prompt + turn
        "teacher": (256, 1024, 4, 8, 4, 8000, False),
        "student": (256, 1024, 2, 8, 4, 8000, False),
        "batch": dict(seq_len=256, student_len=138, insert_pos=128, reply="all"),
    },
    "qwen2.5-7b+0.5b": {  # the shapes of Qwen2.5-7B-Instruct and Qwen2.5-0.5B
        "teacher": (3584, 18944, 28, 28, 4, 152064, False),
        "student": (896, 4864, 24, 14, 2, 151936, True),
        "batch": dict(seq_len=4096, student_len=512, insert_pos=400, reply="alternating"),
    },
}
QWEN25_05B_STUDENT = PRESETS["qwen2.5-7b+0.5b"]["student"]
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
    settings = tlc.LatentSettings(K=K, bop_id=vocab - 2, eop_id=vocab - 1, rollout_impl=args.rollout_impl)
    model = tlc.LatentCommModel(teacher, student, settings, head_num_heads=8, head_dropout=0.1).to(device)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()

    B, T, S = args.batch, args.seq_len, args.student_len
    g = torch.Generator().manual_seed(1)
    insert_pos = args.insert_pos
    labels = torch.full((B, T), tlc.IGNORE_INDEX)
    positions = torch.arange(T)
    if args.reply == "all":
        supervised = positions >= insert_pos
    else:  # assistant turns: 48 supervised tokens, then 48 observation tokens, after the first human turn
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


def run_worker(args, kind: str, K: int, batch: int, rollout_impl: str = "auto") -> dict:
    command = [sys.executable, __file__, "--_worker", kind, "--_K", str(K), "--_batch", str(batch),
               "--_rollout_impl", rollout_impl]  # fmt: skip
    for name in ("preset", "device", "dtype", "attn", "seq_len", "student_len", "insert_pos", "reply", "iters",
                 "warmup"):  # fmt: skip
        command += [f"--{name}", str(getattr(args, name))]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{kind} K={K} batch={batch} rollout={rollout_impl} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_op_rms_normalize():
    """`train_latent_comm._rms_normalize` as one operation forward and one backward: what torch's fused CUDA
    kernel (`_fused_rms_norm`) dispatches where the CPU has only a decomposition. For counting only."""
    import torch

    import train_latent_comm as tlc

    # Explicit schemas: this module's annotations are strings (`from __future__ import annotations`).
    @torch.library.custom_op("latent_bench::rms_normalize", mutates_args=(), schema="(Tensor x, float eps) -> Tensor")
    def rms_normalize(x, eps):
        with torch.no_grad():
            return tlc._RMSNormalize.apply(x, eps)

    @torch.library.custom_op(
        "latent_bench::rms_normalize_backward", mutates_args=(), schema="(Tensor grad, Tensor x, float eps) -> Tensor"
    )
    def rms_normalize_backward(grad, x, eps):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (grad_x,) = torch.autograd.grad(tlc._RMSNormalize.apply(leaf, eps), leaf, grad)
        return grad_x

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps = inputs[1]

    def backward(ctx, grad):
        return rms_normalize_backward(grad, ctx.saved_tensors[0], ctx.eps), None

    rms_normalize.register_autograd(backward, setup_context=setup_context)
    return rms_normalize


def count_ops_per_step(shape, rollout_impl: str, prompt_len: int = 16, fused_norm: bool = False) -> dict:
    """aten operations one latent step dispatches on this device, forward and backward: (K=8 - K=4) / 4.
    `fused_norm`: the lean step's RMSNorms count as one operation each way, as on CUDA."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    import train_latent_comm as tlc

    if fused_norm:
        tlc._rms_normalize = one_op_rms_normalize()

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(qwen2_config(shape, "sdpa"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_config(qwen2_config((64, 64, 1, 4, 2, shape[5], False), "sdpa"))
    settings = tlc.LatentSettings(K=4, bop_id=1, eop_id=2, rollout_impl=rollout_impl)
    model = tlc.LatentCommModel(teacher, student, settings, head_num_heads=4, head_dropout=0.0).train()
    ids = torch.randint(0, shape[5], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    counts = {}
    for K in (4, 8):
        model.settings.K = K
        forward, backward = CountOps(), CountOps()
        with forward:
            latents = model.student_latents(ids, torch.ones_like(ids))
        loss = latents.square().mean()
        with backward:
            loss.backward()
        model.zero_grad(set_to_none=True)
        counts[K] = (forward.n, backward.n)
    per_step = [(counts[8][i] - counts[4][i]) / 4 for i in (0, 1)]
    layers = shape[2]
    return {"forward": per_step[0], "backward": per_step[1], "forward_per_layer": round(per_step[0] / layers, 1),
            "backward_per_layer": round(per_step[1] / layers, 1)}  # fmt: skip


def ops_table(args) -> list[dict]:
    """Each count in a fresh process (the fused-norm stand-in patches the module)."""
    students = {f"{args.preset} student": PRESETS[args.preset]["student"], "Qwen2.5-0.5B student": QWEN25_05B_STUDENT}
    print("aten operations per latent step (batch 1, 16-token prompt); 'lean, fused norm': the lean step with each "
          "RMSNorm one operation each way, as torch's fused CUDA kernel dispatches it", flush=True)  # fmt: skip
    header = ["student", "layers", "rollout", "forward", "backward", "forward_per_layer", "backward_per_layer"]
    print(" | ".join(header), flush=True)
    records = []
    variants = [(impl, False) for impl in args.rollout_impls]
    if "lean" in args.rollout_impls:
        variants.append(("lean", True))
    for name, shape in students.items():
        for impl, fused_norm in variants:
            command = [sys.executable, __file__, "--_count_ops", json.dumps([list(shape), impl, fused_norm])]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"counting {name} {impl} failed:\n{result.stderr[-3000:]}")
            counts = json.loads(result.stdout.strip().splitlines()[-1])
            label = f"{impl}, fused norm" if fused_norm else impl
            record = {"student": name, "layers": shape[2], "rollout": label, **counts}
            records.append(record)
            print(" | ".join(str(record[h]) for h in header), flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="model shapes and batch layout")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: teacher in bf16, autocast")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, flash_attention_2, eager)")
    parser.add_argument("--Ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rollout_impls", nargs="+", choices=["hf", "lean"], default=["hf", "lean"],
                        help="student rollouts to time side by side (each against the same SFT step)")
    parser.add_argument("--seq_len", type=int, default=None, help="teacher tokens per sample (default: the preset's)")
    parser.add_argument("--student_len", type=int, default=None, help="student prompt tokens (default: the preset's)")
    parser.add_argument("--insert_pos", type=int, default=None, help="where the block goes (default: the preset's)")
    parser.add_argument("--reply", choices=["alternating", "all"], default=None, help="supervised tokens after it")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--gpu_name", default=None, help="for MFU: H100, H200 or A100 (default: detected)")
    parser.add_argument("--json", default=None, help="also write the table here as a list of records")
    parser.add_argument("--ops", action="store_true", help="count operations per latent step instead of timing")
    parser.add_argument("--_worker", choices=["full", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--_K", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_rollout_impl", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--_count_ops", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._count_ops:
        shape, impl, fused_norm = json.loads(args._count_ops)
        print(json.dumps(count_ops_per_step(tuple(shape), impl, fused_norm=fused_norm)))
        return 0
    for name, value in PRESETS[args.preset]["batch"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0 < args.insert_pos < args.seq_len:
        parser.error(f"--insert_pos must be inside the {args.seq_len} teacher tokens")

    if args._worker:
        args.batch, args.rollout_impl = args._batch, args._rollout_impl
        result = (worker_full if args._worker == "full" else worker_sft)(args, args._K)
        print(json.dumps(result))
        return 0

    if args.ops:
        records = ops_table(args)
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=2))
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
    header = ["K", "batch", "rollout", "step_s", "teacher_sft_s", "ratio", "rollout_share", "tokens_per_s", "peak_mb",
              "teacher_sft_peak_mb"] + (["mfu"] if peak_flops else [])  # fmt: skip
    print(" | ".join(header), flush=True)
    records = []
    for K in args.Ks:
        for batch in args.batches:
            sft = run_worker(args, "sft", K, batch)
            for impl in args.rollout_impls:
                full = run_worker(args, "full", K, batch, impl)
                record = {
                    "K": K,
                    "batch": batch,
                    "rollout": impl,
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
