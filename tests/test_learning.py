"""The latent carries information: on the color task (tests/learning_task.py), the frozen teacher can only
answer through the student's latent. The final check swaps latents between records: the teacher then
follows the other record's latent, which shows the answer travels in the latent, not in a loss that fell.
The two-stage path (--stage head, then the student on that head, frozen) is checked on data latents that
carry each record's color: stage 1 makes them useful, and the student then learns as well as with CE alone.

These tests must hold on any correct floating-point numerics, not on one trajectory: they are marked
`numerics`, and .ci/run runs them a second time on other kernels.
"""

import math

import numpy as np
import pytest
import torch

import evaluate_latent as ev
import learning_task as task_lib
import train_latent_comm as tlc

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def color_task(tmp_path_factory):
    return task_lib.build_color_task(tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="module")
def trained(color_task, tmp_path_factory):
    model, run = task_lib.train(color_task, tmp_path_factory.mktemp("colors_run") / "run")
    conversations = tlc.parse_conversations(tlc.load_records(color_task.paths["data"]), tlc.ProblemLog())
    return model, run, color_task, conversations


def test_the_teacher_reads_a_color_block_and_guesses_without_one(color_task):
    """The task's premise: the pretrained teacher answers the color of a block, and without a block it has not
    learned the code -> color map (so only a latent can give the answer)."""
    with_block, without = task_lib.teacher_color_probabilities(color_task.paths["teacher"], color_task.records)
    # Measured over task seeds 0-4 and the numerics modes of ENV.md: p(color | its block) >= 0.898 (seed 0:
    # 0.995); without a block every color between 0.18 and 0.33 (seed 0: 0.238 to 0.273). A teacher that cannot
    # read a block would be near 0.25 there; one that learned the map would put ~1 on one color without it.
    diagonal = with_block.diagonal(dim1=1, dim2=2)  # [R, 4]: p(color c | a block of color c)
    assert diagonal.min() > 0.8, diagonal.min()
    assert without.min() > 0.1 and without.max() < 0.5, without  # chance: 0.25


def exact_match(results, conversations, task):
    return float(np.mean([r["text"].strip() == task.color(c.id) for r, c in zip(results, conversations)]))


def latent_report(model, run, task, hidden) -> dict:
    """evaluate_latent's report over every record of the task, with the data latents in `hidden`."""
    settings = {"eval_ratio": 0.0, "seed": 0, "skip_invalid_samples": False}
    dataset = ev.build_eval_dataset(
        run.config, run.teacher_tokenizer, run.student_tokenizer, task.paths["data"], hidden, "all", settings
    )
    return ev.compute_report(model, dataset, tlc.LatentCommCollator(0, 0), batch_size=24, progress=False)


def test_student_latent_carries_the_answer(trained):
    model, run, task, conversations = trained
    report = latent_report(model, run, task, task.paths["hidden"])
    ce = {name: values["ce"] for name, values in report["conditions"].items()}
    assert report["n_targets"] == 24  # one color token per record
    assert ce["no_latent"] > 0.9 * math.log(4)  # the frozen teacher alone: a random color
    assert ce["student_latent"] < 0.15 * ce["no_latent"], ce  # measured 0.004 (task seeds 1-4: up to 0.12)
    assert report["conditions"]["student_latent"]["accuracy"] >= 0.9

    with_latent = ev.generate_with_latent(model, run, conversations, max_new_tokens=1, batch_size=24)
    without = ev.generate_with_latent(model, run, conversations, use_latent=False, max_new_tokens=1, batch_size=24)
    assert exact_match(with_latent, conversations, task) >= 0.9  # chance: 0.25
    assert exact_match(without, conversations, task) <= 0.5


@torch.no_grad()
def test_the_teacher_follows_another_records_latent(trained):
    """Swap: record i reads the latent of a record whose code has another color, and answers that color."""
    model, run, task, conversations = trained
    store = tlc.HiddenStateStore(task.paths["hidden"])
    data_args = ev._data_arguments(run.config)
    samples = [
        tlc.encode_conversation(
            c, store.row_of[c.id], run.teacher_tokenizer, run.student_tokenizer, data_args, task_lib.K
        )
        for c in conversations
    ]
    dataset = tlc.LatentCommDataset(samples, store, task_lib.K)
    batch = tlc.LatentCommCollator(0, 0)([dataset[i] for i in range(len(samples))])
    latents = model.project_student_latents(
        model.student_latents(batch["student_input_ids"], batch["student_attention_mask"])
    )
    colors = [task.color(c.id) for c in conversations]
    n = len(colors)
    donors = [next(j % n for j in range(i + 1, i + n) if colors[j % n] != colors[i]) for i in range(n)]
    hidden = model.teacher_hidden(batch["input_ids"], batch["attention_mask"], batch["insert_pos"], latents[donors])
    answer_pos = batch["insert_pos"] + task_lib.K + 1  # <eop> predicts the first assistant token
    predicted = model.teacher.get_output_embeddings()(hidden[torch.arange(len(samples)), answer_pos]).argmax(-1)
    predicted = run.teacher_tokenizer.convert_ids_to_tokens(predicted.tolist())
    follows_donor = np.mean([p == colors[d] for p, d in zip(predicted, donors)])
    follows_own = np.mean([p == colors[i] for i, p in enumerate(predicted)])
    assert follows_donor >= 0.9 and follows_own <= 0.1


# ----------------------------------------------------------------------------------------------------
# Two stages: the head first (--stage head), then the student on that head, frozen
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stage(color_task, tmp_path_factory):
    """Stage 1 on data latents that carry each record's color (a quarter of the records held out), then
    stage 2 with TRAINING_FLAGS on the stage-1 head, frozen, with the loss weights of the command that stage 1
    prints (KL and Align 0.1: see test_two_stages_learn_as_well_as_ce_alone)."""
    root = tmp_path_factory.mktemp("colors_two_stage")
    hidden = task_lib.write_color_latents(color_task, str(root / "color_latents"))
    stage_one = task_lib.train_head(color_task, hidden, root / "head")
    head = str(root / "head" / tlc.HEAD_FILE_NAME)
    model, run = task_lib.train(color_task, root / "student", "--hf_hidden_repo", hidden, "--hidden_head_ckpt", head,
                                "--freeze_head", *tlc.STAGE_TWO_LOSS_FLAGS)  # fmt: skip
    return stage_one, model, run, hidden


def test_the_head_stage_makes_the_data_latent_useful(two_stage):
    """On records it never trained on, the teacher reading the data latent through the stage-1 head answers
    their color, where without a block it guesses (log 4)."""
    stage_one = two_stage[0]
    assert stage_one["eval_ce_no_latent"] > 0.9 * math.log(4)
    # Measured over task seeds 0-9 (default numerics) and 0-4 (each mode of ENV.md and CI's), 35 runs (README,
    # "Two stages: a head first"): at most 0.21 of the no-latent CE (seed 3: 0.28 against 1.37), 0.003 for this
    # seed in every mode. A head that does not read the latent stays at the no-latent CE or above (the fresh
    # head's training CE starts at 2.3), so the margin is 2.4x the largest fraction measured.
    assert stage_one["eval_ce"] < 0.5 * stage_one["eval_ce_no_latent"], stage_one


def test_two_stages_learn_as_well_as_ce_alone(trained, two_stage):
    """With the stage-1 head frozen, KL and Align pull towards a data latent that carries the answer, and the
    student learns as well as with CE alone (`trained`: KL and Align off, the head trained) or, where the data
    latent serves the teacher less well than CE alone's latent, as well as the data latent it is distilled
    towards.

    The weights are the published pipeline's 1 / 0.1 / 0.1, which stage 1's printed command uses: with the
    defaults 1 / 1 / 1 the student stayed in a wrong answer in 18 of 35 runs (task seeds and numerics modes;
    this seed under MKL_CBWR=AVX2, ATEN_CPU_CAPABILITY=avx2 and CI's second mode: README)."""
    ce_only_model, ce_only_run, task, _ = trained
    _, model, run, hidden = two_stage
    ce_only = latent_report(ce_only_model, ce_only_run, task, hidden)["conditions"]["student_latent"]["ce"]
    report = latent_report(model, run, task, hidden)["conditions"]
    assert run.config["settings"]["kl_weight"] == run.config["settings"]["align_weight"] == 0.1
    # The head did not move, so run D still answers (what the KL term distils from). Measured: at most 0.16 of
    # the no-latent CE (task seed 3: 0.22).
    data_latent = report["data_latent"]["ce"]
    assert data_latent < 0.5 * report["no_latent"]["ce"], report["data_latent"]
    assert report["student_latent"]["accuracy"] >= 0.9
    # Measured over task seeds 0-9 (default numerics) and 0-4 (each mode of ENV.md and CI's), 35 runs: at most
    # 0.03 above the larger of CE alone and the data latent's CE (0.17 above CE alone for task seed 3 under CI's
    # modes, where the data latent's CE is 0.22 and CE alone reached 0.05); for this seed 0.004, under CE
    # alone's 0.004-0.005 in every mode. The margin is 3x that largest excess. For this seed a student left in
    # a wrong answer (the defaults 1 / 1 / 1 under three of the modes) ended 0.8 above.
    assert report["student_latent"]["ce"] <= max(ce_only, data_latent) + 0.1, (report, ce_only)
