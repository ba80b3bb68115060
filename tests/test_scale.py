"""Scale features that need no second process: length-grouped batches and chunked vocabulary logits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers.trainer_pt_utils import LengthGroupedSampler

import train_latent_comm as tlc


def _uneven_data(assets, tmp_path, copies=4):
    """`copies` x the demo records under new ids, each with a longer last reply than the one before, and
    their data latents."""
    import datasets

    records = json.loads(Path(assets["data"]).read_text())
    store = tlc.HiddenStateStore(assets["hidden_states"])
    uneven, latents = [], {"task_id": [], "hidden_state": []}
    for copy in range(copies):
        for record in records:
            new = json.loads(json.dumps(record))
            new["id"] = f"{record['id']}-{copy}"
            new["conversations"][-1]["value"] += " Act: look" * len(uneven)
            uneven.append(new)
            latents["task_id"].append(new["id"])
            latents["hidden_state"].append(store.read(store.row_of[str(record["id"])]))
    path = tmp_path / "uneven.json"
    path.write_text(json.dumps(uneven))
    datasets.Dataset.from_dict(latents).save_to_disk(str(tmp_path / "uneven_latents"))
    return str(path), str(tmp_path / "uneven_latents")


def _padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_group_by_length_batches_by_the_samples_lengths(assets, tmp_path, tiny_model, monkeypatch):
    data, latents = _uneven_data(assets, tmp_path)
    argv = [
        "--teacher_model_name_or_path", assets["teacher"], "--student_model_name_or_path", assets["student"],
        "--data_path", data, "--hf_hidden_repo", latents,
        "--output_dir", str(tmp_path / "out"), "--K", "5", "--model_max_length", "1024", "--eval_ratio", "0",
        "--per_device_train_batch_size", "3", "--group_by_length", "--use_cpu",
    ]  # fmt: skip
    model_args, data_args, latent_args, training_args = tlc.parse_args(argv)
    assert training_args.train_sampling_strategy == "group_by_length"
    teacher_tok, student_tok, _ = tlc.build_tokenizers(model_args, data_args)
    train, _, collator = tlc.build_datasets(model_args, data_args, latent_args, training_args, teacher_tok, student_tok)
    lengths = train.lengths
    assert lengths == [len(train[i]["input_ids"]) for i in range(len(train))]
    assert len(set(lengths)) > len(lengths) // 2  # the data really is uneven

    trainer = tlc.LatentCommTrainer(
        model=tiny_model, args=training_args, train_dataset=train, data_collator=collator, latent_run=None
    )
    # The lengths come from the tokenized samples: building the sampler loads no item (no data latent).
    monkeypatch.setattr(tlc.LatentCommDataset, "__getitem__", lambda *a: pytest.fail("item loaded"))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths
    order = list(sampler)
    assert sorted(order) == list(range(len(train)))
    batches = [order[i : i + 3] for i in range(0, len(order), 3)]
    # 48 samples in batches of 3 make mega-batches of 12, each sorted by length.
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(len(lengths)).tolist() for _ in range(20)]
    random_padding = np.mean([_padding(lengths, [p[i : i + 3] for i in range(0, len(p), 3)]) for p in shuffled])
    assert _padding(lengths, batches) < 0.5 * random_padding


class _CountingHead(nn.Linear):
    calls = 0

    def forward(self, x):
        _CountingHead.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("step", [1, 3, 100])
def test_chunked_terms_equal_unchunked_and_pad_to_the_requested_calls(step):
    torch.manual_seed(0)
    head = _CountingHead(8, 11, bias=False)
    rows = torch.randn(7, 8, requires_grad=True)
    target_rows, targets = torch.randn(7, 8), torch.randint(0, 11, (7,))
    full_nll = torch.nn.functional.cross_entropy(head(rows), targets, reduction="none")
    full_kl = tlc.kl_per_token(head(target_rows), head(rows), 2.0)
    (grad_full,) = torch.autograd.grad(full_nll.sum() + full_kl.sum(), rows)

    needed = -(-7 // step)
    _CountingHead.calls = 0
    nll = tlc.chunked_nll(rows, targets, head, step=step, n_chunks=needed + 2)  # two empty chunks
    assert _CountingHead.calls == needed + 2  # what another rank with more rows would run
    kl = tlc.chunked_kl(rows, target_rows, head, 2.0, step=step, n_chunks=0)
    entropy = tlc.chunked_entropy(rows, head, step=step, n_chunks=needed + 1)
    torch.testing.assert_close(nll, full_nll)
    torch.testing.assert_close(kl, full_kl)
    torch.testing.assert_close(entropy, tlc.entropy_from_logits(head(rows)).detach())
    (grad,) = torch.autograd.grad(nll.sum() + kl.sum(), rows)
    torch.testing.assert_close(grad, grad_full)


def test_chunk_counts_outside_zero3_are_ceil_divisions():
    head = nn.Linear(4, 10)
    assert tlc.chunk_counts_across_ranks(head, [0, 1, 7, 8, 9], 4) == [0, 1, 2, 2, 3]
    assert tlc.rows_per_chunk(head) == tlc.LOGIT_CHUNK_ELEMENTS // 10 and tlc.rows_per_chunk(head, 5) == 5
