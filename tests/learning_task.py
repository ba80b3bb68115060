"""The color task: a task the frozen teacher can only solve through the student's latent. Shared by the tests
that check whether training learns (tests/test_learning.py), so that each builds on the same task and the
same training settings, chosen to learn on any correct floating-point numerics (see TRAINING_FLAGS).

Each record asks for the color of a code word ("Which color goes with code kappa."), and the answer is an
arbitrary fixed map from 8 codes to 4 colors. The teacher is pretrained for one skill only: when a color
appears between `<bop>` and `<eop>`, it answers that color; without such a block it answers a uniformly
random color (colors drawn independently of the code, so the map is never shown to it). Frozen, it
therefore cannot get from the code to the color: without a latent its CE is log 4 and its greedy answer
is right by chance. The student (trained) sees the code; only if it learns the map and writes the color
into its latent can the teacher answer.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import train_latent_comm as tlc

COLORS = ["red", "green", "blue", "gold"]
CODES = ["kappa", "delta", "omega", "sigma", "theta", "alpha", "gamma", "zeta"]
FILLERS = ["Tell me the color for code", "Which color goes with code", "Name the color of code"]
K = 2
HIDDEN = 64  # teacher and student width

# Why these settings. The fresh head's first spliced rows are ~27x the norm of the teacher's token
# embeddings and nearly the same for every record (README, "Loss weights and the head"), and this teacher,
# trained on exact color rows, answers such rows almost uniformly and with almost no gradient. The earlier
# settings (constant learning rate 2e-3, no warm-up, 250 steps) made the first ten Adam steps, which move
# every bias by ~lr each, push CE from log 4 to 3.2; the run then sat on plateaus (18 of 24 records sharing
# one latent, gradient norm ~1e-4) until rounding let it out or not, and clipped gradient spikes (norms of
# 50-750) kept throwing it off solutions up to the last step. Final student-latent CE with those settings
# under the modes default, ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2 and MKL_CBWR=COMPATIBLE: task seed 0:
# 0.004, 1.39, 0.98, 0.005; seed 2: 0.025, 0.12, 0.57, 0.30 (spikes at the end); seed 3: 0.21 in each.
# A 10% warm-up keeps the first steps small, a learning rate of 1e-3 halves every step, and the cosine
# decay lets each run settle: with these settings, task seeds 0-4 under each of those modes all ended with
# accuracy 1.0 and CE from 0.004 (seed 0, every mode) to 0.12 (seed 2, every mode), against a no-latent CE
# of log 4 = 1.39. The same schedule at 2e-3 still ended at 0.67 once (seed 0, default mode).
TRAINING_FLAGS = (
    "--K", str(K), "--model_max_length", "64", "--head_num_heads", "4", "--head_dropout", "0",
    "--kl_weight", "0", "--align_weight", "0", "--eval_ratio", "0", "--max_steps", "200",
    "--per_device_train_batch_size", "24", "--learning_rate", "1e-3", "--warmup_steps", "20",
    "--lr_scheduler_type", "cosine", "--max_grad_norm", "1.0", "--logging_steps", "50", "--save_strategy", "no",
    "--seed", "0", "--use_cpu", "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "True",
)  # fmt: skip


@dataclass
class ColorTask:
    paths: dict[str, str]  # teacher, student, data, hidden
    color_of: dict[str, str]  # code -> color
    records: list[dict]

    def color(self, record_id: str) -> str:
        return self.color_of[record_id.split("-")[0]]


def color_records(seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    rng = np.random.default_rng(seed)
    color_of = {code: COLORS[i % 4] for i, code in enumerate(rng.permutation(CODES))}
    records = [
        {"id": f"{code}-{v}", "conversations": [{"from": "human", "value": f"{filler} {code}."},
                                                {"from": "gpt", "value": color_of[code]}]}
        for code in CODES for v, filler in enumerate(FILLERS)
    ]  # fmt: skip
    return records, color_of


def block_and_plain_sequences(tokenizer, records: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """For every record and color: its question with a block of that color, then the color (the teacher's
    skill); and its question alone, then the color (every color after every code, so the map cannot be
    learned from it)."""
    bop, eop = tokenizer.convert_tokens_to_ids([tlc.BOP_TOKEN, tlc.EOP_TOKEN])

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    with_block, plain = [], []
    for record in records:
        head = ids(record["conversations"][0]["value"] + "\n")
        for color in COLORS:
            with_block.append(head + [bop] + ids(color) * K + [eop] + ids(color))
            plain.append(head + ids(color))
    return with_block, plain


def pretrain_teacher(teacher, tokenizer, records: list[dict], steps: int = 50, lr: float = 1e-2, seed: int = 0):
    """Full-batch AdamW on the answer token of every sequence of `block_and_plain_sequences`."""
    with_block, plain = block_and_plain_sequences(tokenizer, records)
    sequences = with_block + plain
    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    labels = torch.full_like(input_ids, tlc.IGNORE_INDEX)
    for i, sequence in enumerate(sequences):
        labels[i, len(sequence) - 1] = sequence[-1]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    teacher.train()
    for _ in range(steps):
        teacher(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return teacher.eval()


@torch.no_grad()
def teacher_color_probabilities(teacher_path: str, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved teacher's probabilities of the 4 colors as the answer: `[R, 4 blocks, 4]` after a block of
    each color, and `[R, 4]` without a block."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    color_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in COLORS]
    with_block, plain = block_and_plain_sequences(tokenizer, records)

    def answer_probabilities(sequences):
        prompts = [s[:-1] for s in sequences]  # the answer token is what is predicted
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding: the answer is last
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        return logits.softmax(-1)[:, color_ids].view(len(records), len(COLORS), len(COLORS))

    return answer_probabilities(with_block), answer_probabilities(plain)[:, 0]


def write_hidden_states(path: str, records: list[dict], latents: list[np.ndarray]) -> None:
    import datasets

    datasets.Dataset.from_dict({"task_id": [r["id"] for r in records], "hidden_state": latents}).save_to_disk(path)


def build_color_task(root: Path, seed: int = 0) -> ColorTask:
    """Write the tokenizer (with <bop>/<eop>), the pretrained teacher, a random student, the records and
    (unused, finite) data latents under `root`."""
    records, color_of = color_records(seed)
    corpus = [r["conversations"][0]["value"] for r in records] + COLORS + [tlc.DEFAULT_PLAN_PROMPT]
    tokenizer = tlc.build_tiny_tokenizer(corpus * 8, vocab_size=400)
    # Markers the teacher was trained with: training keeps their rows (SPEC 3.1).
    tokenizer.add_tokens([tlc.BOP_TOKEN, tlc.EOP_TOKEN], special_tokens=True)
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in COLORS)
    teacher = tlc.build_tiny_causal_lm(len(tokenizer), HIDDEN, seed=2 * seed)
    student = tlc.build_tiny_causal_lm(len(tokenizer), HIDDEN, tie=True, seed=2 * seed + 1)
    pretrain_teacher(teacher, tokenizer, records, seed=seed)

    paths = {name: str(root / name) for name in ("teacher", "student", "hidden")}
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["data"] = str(root / "colors.json")
    Path(paths["data"]).write_text(json.dumps(records))
    rng = np.random.default_rng(seed)
    write_hidden_states(paths["hidden"], records, [rng.normal(size=(K, HIDDEN)).astype(np.float32) for _ in records])
    return ColorTask(paths, color_of, records)


def run_in_one_thread(argv: list[str]) -> None:
    """`tlc.main(argv)`, which must succeed, in one thread: these matrices are tiny, and on a busy 2-core machine
    a thread pool made training 25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tlc.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def train(task: ColorTask, output_dir: Path, *extra: str):
    """Train on the task with TRAINING_FLAGS (then `extra` flags, which override them) in one thread, and
    reload the result: returns `(model, run)` of `tlc.load_latent_model`."""
    argv = [
        "--teacher_model_name_or_path", task.paths["teacher"], "--student_model_name_or_path", task.paths["student"],
        "--data_path", task.paths["data"], "--hf_hidden_repo", task.paths["hidden"], "--output_dir", str(output_dir),
        *TRAINING_FLAGS, *extra,
    ]  # fmt: skip
    run_in_one_thread(argv)
    return tlc.load_latent_model(str(output_dir))


# The head stage (--stage head) on the color task needs data latents that carry the answer: each record's K rows
# are a fixed random vector of its color (N(0, 1) per element, one per color) plus Gaussian noise of LATENT_NOISE
# per element, so that a head has to learn to read the color out of a noisy vector and map it to what the
# teacher reads in a block (the color's token embedding, RMS ~0.08 per element, nothing like these vectors).
# For seeds 0-9 the colors' vectors lie 9.4-13.0 apart (11.2 on average): at a noise of 0.5 the midpoint
# between the closest two is 9.4 noise standard deviations from each: what tells the colors apart on the records
# stage 1 trains on tells them apart on the quarter it holds out (README, "Two stages: a head first").
# The teacher's own last hidden state over the color word, plus noise of its RMS (an earlier version), carried
# too little: for task seed 2 the states of "blue" and "gold" lie 2.7 apart (norms 9.3; for seed 0 the colors
# lie 14.5-16.6 apart), and stage 1 reached an eval CE of 1.01 on the held-out records (no latent: 1.37).
LATENT_NOISE = 0.5


def write_color_latents(task: ColorTask, path: str, noise: float = LATENT_NOISE, seed: int = 0) -> str:
    """Write data latents that carry each record's color (see LATENT_NOISE) to `path`; returns it."""
    rng = np.random.default_rng(seed)
    color_vectors = {color: rng.normal(size=HIDDEN) for color in COLORS}
    latents = [
        (color_vectors[task.color(r["id"])] + rng.normal(scale=noise, size=(K, HIDDEN))).astype(np.float32)
        for r in task.records
    ]
    write_hidden_states(path, task.records, latents)
    return path


def train_head(task: ColorTask, hidden: str, output_dir: Path, *extra: str) -> dict:
    """The head stage on the task with TRAINING_FLAGS over the data latents in `hidden`, a quarter of the
    records held out and evaluated at the end (then `extra`), in one thread; returns that final evaluation
    (eval_results.json)."""
    argv = [
        "--stage", "head", "--teacher_model_name_or_path", task.paths["teacher"], "--data_path", task.paths["data"],
        "--hf_hidden_repo", hidden, "--output_dir", str(output_dir), *TRAINING_FLAGS,
        "--eval_ratio", "0.25", "--eval_strategy", "no", "--load_best_model_at_end", "False", *extra,
    ]  # fmt: skip
    run_in_one_thread(argv)
    return json.loads((output_dir / "eval_results.json").read_text())
