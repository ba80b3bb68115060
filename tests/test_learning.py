"""The latent carries information: a task the frozen teacher can only solve through the student's latent.

Each record asks for the color of a code word ("Which color goes with code kappa."), and the answer is an
arbitrary fixed map from 8 codes to 4 colors. The teacher is pretrained for one skill only: when a color
appears between `<bop>` and `<eop>`, it answers that color; without such a block it answers a uniformly
random color (colors drawn independently of the code, so the map is never shown to it). Frozen, it
therefore cannot get from the code to the color: without a latent its CE is log 4 and its greedy answer
is right by chance. The student (trained) sees the code; only if it learns the map and writes the color
into its latent can the teacher answer. The final check swaps latents between records: the teacher then
follows the other record's latent, which shows the answer travels in the latent, not in a loss that fell.
"""

import json
import math

import numpy as np
import pytest
import torch

import evaluate_latent as ev
import train_latent_comm as tlc

COLORS = ["red", "green", "blue", "gold"]
CODES = ["kappa", "delta", "omega", "sigma", "theta", "alpha", "gamma", "zeta"]
FILLERS = ["Tell me the color for code", "Which color goes with code", "Name the color of code"]
K = 2


def color_task(root):
    """Write the tokenizer (with <bop>/<eop>), the pretrained teacher, a random student, the records and
    (unused, finite) data latents; return the paths and the code -> color map."""
    import datasets

    rng = np.random.default_rng(0)
    color_of = {code: COLORS[i % 4] for i, code in enumerate(rng.permutation(CODES))}
    records = [
        {"id": f"{code}-{v}", "conversations": [{"from": "human", "value": f"{filler} {code}."},
                                                {"from": "gpt", "value": color_of[code]}]}
        for code in CODES for v, filler in enumerate(FILLERS)
    ]  # fmt: skip
    corpus = [r["conversations"][0]["value"] for r in records] + COLORS + [tlc.DEFAULT_PLAN_PROMPT]
    tokenizer = tlc.build_tiny_tokenizer(corpus * 8, vocab_size=400)
    # Markers the teacher was trained with: training keeps their rows (SPEC 3.1).
    tokenizer.add_tokens([tlc.BOP_TOKEN, tlc.EOP_TOKEN], special_tokens=True)
    bop, eop = tokenizer.convert_tokens_to_ids([tlc.BOP_TOKEN, tlc.EOP_TOKEN])

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert all(len(ids(c)) == 1 for c in COLORS)
    teacher = tlc.build_tiny_causal_lm(len(tokenizer), 64, seed=0)
    student = tlc.build_tiny_causal_lm(len(tokenizer), 64, tie=True, seed=1)
    sequences, labels = [], []
    for record in records:
        head = ids(record["conversations"][0]["value"] + "\n")
        for color in COLORS:  # every color after every code: the map cannot be learned from this
            for seq in (head + [bop] + ids(color) * K + [eop] + ids(color), head + ids(color)):
                sequences.append(seq)
                labels.append([tlc.IGNORE_INDEX] * (len(seq) - 1) + ids(color))
    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    label_ids = torch.tensor([lab + [tlc.IGNORE_INDEX] * (width - len(lab)) for lab in labels])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    teacher.train()
    for _ in range(50):
        teacher(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()

    paths = {name: str(root / name) for name in ("teacher", "student", "hidden")}
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["data"] = str(root / "colors.json")
    (root / "colors.json").write_text(json.dumps(records))
    datasets.Dataset.from_dict(
        {
            "task_id": [r["id"] for r in records],
            "hidden_state": [rng.normal(size=(K, 64)).astype(np.float32) for _ in records],
        }
    ).save_to_disk(paths["hidden"])
    return paths, color_of


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # One thread: these matrices are tiny, and on a busy 2-core machine a thread pool made training 25x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield train_color_task(tmp_path_factory.mktemp("colors"))
    finally:
        torch.set_num_threads(threads)


def train_color_task(root):
    paths, color_of = color_task(root)
    out = root / "run"
    argv = [
        "--teacher_model_name_or_path", paths["teacher"], "--student_model_name_or_path", paths["student"],
        "--data_path", paths["data"], "--hf_hidden_repo", paths["hidden"], "--output_dir", str(out),
        "--K", str(K), "--model_max_length", "64", "--head_num_heads", "4", "--head_dropout", "0",
        "--kl_weight", "0", "--align_weight", "0", "--eval_ratio", "0", "--max_steps", "250",
        "--per_device_train_batch_size", "24", "--learning_rate", "2e-3", "--warmup_steps", "0",
        "--lr_scheduler_type", "constant", "--logging_steps", "50", "--save_strategy", "no", "--seed", "0",
        "--use_cpu", "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "True",
    ]  # fmt: skip
    assert tlc.main(argv) == 0
    model, run = tlc.load_latent_model(str(out))
    conversations = tlc.parse_conversations(tlc.load_records(paths["data"]), tlc.ProblemLog())
    return model, run, paths, conversations, color_of


def exact_match(results, conversations, color_of):
    return float(np.mean([r["text"].strip() == color_of[c.id.split("-")[0]] for r, c in zip(results, conversations)]))


def test_student_latent_carries_the_answer(trained):
    model, run, paths, conversations, color_of = trained
    settings = {"eval_ratio": 0.0, "seed": 0, "skip_invalid_samples": False}
    dataset = ev.build_eval_dataset(
        run.config, run.teacher_tokenizer, run.student_tokenizer, paths["data"], paths["hidden"], "all", settings
    )
    report = ev.compute_report(model, dataset, tlc.LatentCommCollator(0, 0), batch_size=24, progress=False)
    ce = {name: values["ce"] for name, values in report["conditions"].items()}
    assert report["n_targets"] == 24  # one color token per record
    assert ce["no_latent"] > 0.9 * math.log(4)  # the frozen teacher alone: a random color
    assert ce["student_latent"] < 0.15 * ce["no_latent"], ce
    assert report["conditions"]["student_latent"]["accuracy"] >= 0.9

    with_latent = ev.generate_with_latent(model, run, conversations, max_new_tokens=1, batch_size=24)
    without = ev.generate_with_latent(model, run, conversations, use_latent=False, max_new_tokens=1, batch_size=24)
    assert exact_match(with_latent, conversations, color_of) >= 0.9  # chance: 0.25
    assert exact_match(without, conversations, color_of) <= 0.5


@torch.no_grad()
def test_the_teacher_follows_another_records_latent(trained):
    """Swap: record i reads the latent of a record whose code has another color, and answers that color."""
    model, run, paths, conversations, color_of = trained
    store = tlc.HiddenStateStore(paths["hidden"])
    data_args = ev._data_arguments(run.config)
    samples = [
        tlc.encode_conversation(c, store.row_of[c.id], run.teacher_tokenizer, run.student_tokenizer, data_args, K)
        for c in conversations
    ]
    batch = tlc.LatentCommCollator(0, 0)([tlc.LatentCommDataset(samples, store, K)[i] for i in range(len(samples))])
    latents = model.project_student_latents(
        model.student_latents(batch["student_input_ids"], batch["student_attention_mask"])
    )
    colors = [color_of[c.id.split("-")[0]] for c in conversations]
    n = len(colors)
    donors = [next(j % n for j in range(i + 1, i + n) if colors[j % n] != colors[i]) for i in range(n)]
    hidden = model.teacher_hidden(batch["input_ids"], batch["attention_mask"], batch["insert_pos"], latents[donors])
    answer_pos = batch["insert_pos"] + K + 1  # <eop> predicts the first assistant token
    predicted = model.teacher.get_output_embeddings()(hidden[torch.arange(len(samples)), answer_pos]).argmax(-1)
    predicted = run.teacher_tokenizer.convert_ids_to_tokens(predicted.tolist())
    follows_donor = np.mean([p == colors[d] for p, d in zip(predicted, donors)])
    follows_own = np.mean([p == colors[i] for i, p in enumerate(predicted)])
    assert follows_donor >= 0.9 and follows_own <= 0.1
