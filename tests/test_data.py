"""Data side of train_latent_comm.py: loading, validation, rendering, splice positions, truncation,
student prompts, splitting, collation, data latents, argument and config parsing, and the CLI's
validation errors (one line, exit status 2, before any model weights load).

Expected values are computed independently: token ids by tokenizing each piece by hand, chat prefixes by
rendering the tokenizer's template directly.
"""

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_latent_comm as tlc
from conftest import SCRIPT

IGNORE = -100
IM_END = "<|im_end|>"


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _conversation(*messages, record_id="r-1"):
    """Build a Conversation through parse_conversations (so role aliases are resolved the real way)."""
    records = [{"id": record_id, "conversations": [{"from": f, "value": v} for f, v in messages]}]
    problems = tlc.ProblemLog()
    convs = tlc.parse_conversations(records, problems)
    assert not problems, problems.summary()
    assert len(convs) == 1
    return convs[0]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _data_args(**kwargs):
    return tlc.DataArguments(**kwargs)


def _encode(conv, tok, student_tok, K=5, **data_kwargs):
    return tlc.encode_conversation(conv, 0, tok, student_tok, _data_args(**data_kwargs), K)


def _runs(mask):
    """Contiguous [start, end) runs where mask is True."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _template(tok, messages):
    return tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=False
    )


MULTI_TURN = (
    ("system", "You are a careful household agent."),
    ("human", "You are in the middle of a room. Your task is to: put a mug in desk 1."),
    ("gpt", "Think: the mug is likely on the shelf 2.\nAct: go to shelf 2"),
    ("human", "On the shelf 2, you see a mug 1."),
    ("gpt", "Act: take mug 1 from shelf 2"),
)
CANON = {"system": "system", "human": "user", "gpt": "assistant"}


@pytest.fixture(scope="module")
def student_tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["student"])


# ----------------------------------------------------------------------------------------------------
# 1. parsing and plain rendering
# ----------------------------------------------------------------------------------------------------


def test_parse_conversations_roles_ids_and_usability():
    records = [
        {"id": "a", "conversations": [{"from": "Human", "value": "hi"}, {"from": "GPT", "value": "ok"}]},
        {"id": 7, "conversations": [{"from": "USER", "value": "hi"}, {"from": "Assistant", "value": "ok"}]},
        # assistant before the first user message is fine as long as one follows it
        {
            "id": "c",
            "conversations": [
                {"from": "gpt", "value": "x"},
                {"from": "human", "value": "y"},
                {"from": "gpt", "value": "z"},
            ],
        },
        {"id": "no-user", "conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "z"}]},
        {"id": "no-answer", "conversations": [{"from": "gpt", "value": "z"}, {"from": "human", "value": "y"}]},
        {"id": "bad-role", "conversations": [{"from": "human", "value": "y"}, {"from": "robot", "value": "z"}]},
        {"id": "a", "conversations": [{"from": "human", "value": "y"}, {"from": "gpt", "value": "z"}]},
        {"id": "7", "conversations": [{"from": "human", "value": "y"}, {"from": "gpt", "value": "z"}]},
    ]
    problems = tlc.ProblemLog()
    convs = tlc.parse_conversations(records, problems)
    assert [c.id for c in convs] == ["a", "7", "c"]
    assert convs[0].messages == [("user", "hi"), ("assistant", "ok")]
    assert convs[1].messages == [("user", "hi"), ("assistant", "ok")]
    assert convs[2].first_user_index == 1
    assert problems.bad_ids() == {"no-user", "no-answer", "bad-role", "a", "7"}
    summary = problems.summary(max_ids=10)
    assert "'robot'" in summary or '"robot"' in summary
    assert "\n" not in summary


def test_load_records_json_array_and_json_lines_agree(tmp_path, assets):
    records = json.loads(Path(assets["data"]).read_text())
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert tlc.load_records(assets["data"]) == records
    assert tlc.load_records(str(jsonl)) == records


def test_the_messages_role_content_layout_reads_as_the_same_conversation(tokenizer, student_tokenizer):
    """OpenAI / chat-template records ({"messages": [{"role", "content"}]}) mean what ShareGPT's do."""
    sharegpt = {"id": "a", "conversations": [{"from": "system", "value": "Be careful."},
                                             {"from": "human", "value": "Put a mug in the fridge."},
                                             {"from": "gpt", "value": "Act: go to countertop 1"}]}  # fmt: skip
    openai = {"id": "a", "messages": [{"role": "system", "content": "Be careful."},
                                      {"role": "user", "content": "Put a mug in the fridge."},
                                      {"role": "assistant", "content": "Act: go to countertop 1"}]}  # fmt: skip
    mixed = {"id": "a", "conversations": [{"role": "system", "content": "Be careful."},
                                          {"from": "human", "value": "Put a mug in the fridge."},
                                          {"role": "assistant", "content": "Act: go to countertop 1"}]}  # fmt: skip
    expected = tlc.parse_conversations([sharegpt], tlc.ProblemLog())[0]
    for record in (openai, mixed):
        problems = tlc.ProblemLog()
        (conv,) = tlc.parse_conversations([record], problems)
        assert not problems and conv == expected
        for fmt in ("plain", "chat"):
            got = _encode(conv, tokenizer, student_tokenizer, conversation_format=fmt)
            want = _encode(expected, tokenizer, student_tokenizer, conversation_format=fmt)
            assert got.input_ids.tolist() == want.input_ids.tolist() and got.insert_pos == want.insert_pos
            assert got.labels.tolist() == want.labels.tolist()

    problems = tlc.ProblemLog()
    bad = [
        {"id": "both", "conversations": sharegpt["conversations"], "messages": openai["messages"]},
        {"id": "parts", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                     {"role": "assistant", "content": "ok"}]},  # fmt: skip
        {"id": "tool", "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]},
    ]
    assert tlc.parse_conversations(bad, problems) == []
    assert problems.by_kind == {
        "has both 'conversations' and 'messages' (keep one)": ["both"],
        "has a message without string 'from' and 'value' (or 'role' and 'content')": ["parts"],
        "has unknown role 'tool'": ["tool"],
    }


def test_a_top_level_json_object_is_read_only_in_the_layouts_that_hold_records(tmp_path, assets):
    records = json.loads(Path(assets["data"]).read_text())[:3]
    path = tmp_path / "data.json"

    def load(value, indent=1):
        path.write_text(json.dumps(value, indent=indent))
        return tlc.load_records(str(path))

    assert load({"data": records}) == records  # one key holding the array
    keyed = {r["id"]: {"conversations": r["conversations"]} for r in records}
    assert load(keyed) == records  # records keyed by id, in file order
    assert load({r["id"]: r for r in records}) == records  # ... which may repeat their id
    assert load(records[0]) == [records[0]]  # one record (a JSON Lines file of one line), even pretty-printed
    assert load(records[0], indent=None) == [records[0]]
    with pytest.raises(tlc.LatentCommError, match="the record under key 'task-0' has another id, 'task-1'"):
        load({"task-0": records[1]})
    for other in ({"version": 2, "records": records}, {"data": records, "meta": {"n": 3}}, {}):
        with pytest.raises(tlc.LatentCommError, match=r"holds one JSON object \((keys 'version'|keys 'data'|empty)"
                           r".*expected a JSON array of records"):  # fmt: skip
            load(other)


def test_json_and_json_lines_files_as_hf_hidden_repo(tmp_path, assets, monkeypatch):
    """Read with the `datasets` builder of their format: converted once to an Arrow table in the datasets
    cache and memory-mapped, like a save_to_disk directory; the same rows."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    reference = tlc.HiddenStateStore(assets["hidden_states"])
    table = datasets.load_from_disk(assets["hidden_states"])
    rows = [{"task_id": r["task_id"], "hidden_state": np.asarray(r["hidden_state"]).tolist()} for r in table]
    (tmp_path / "hidden.json").write_text(json.dumps(rows))
    (tmp_path / "hidden.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("hidden.json", "hidden.jsonl"):
        path = str(tmp_path / name)
        assert tlc.hub_or_local_problem("--hf_hidden_repo", path, "dataset", tuple(tlc.HIDDEN_FILE_BUILDERS)) is None
        store = tlc.HiddenStateStore(path)
        assert store.row_of == reference.row_of and store._remappable
        for row in reference.row_of.values():  # pyarrow's JSON parser may round a decimal to the next float32
            np.testing.assert_allclose(store.read(row), reference.read(row), rtol=1e-6, atol=0)
    (tmp_path / "hidden.txt").write_text("")
    problem = tlc.hub_or_local_problem("--hf_hidden_repo", str(tmp_path / "hidden.txt"), "dataset", (".json", ".jsonl"))
    assert problem.endswith("hidden.txt is a file; expected a directory or a .json/.jsonl file")


def test_plain_rendering_exact_tokens_labels_and_insert_pos(tokenizer, student_tokenizer):
    conv = _conversation(*MULTI_TURN)
    sample = _encode(conv, tokenizer, student_tokenizer, K=5)

    expected_ids, expected_labels, insert_pos = [], [], None
    for i, (role, text) in enumerate(MULTI_TURN):
        text_ids, nl_ids = _ids(tokenizer, text), _ids(tokenizer, "\n")
        expected_ids += text_ids + nl_ids
        expected_labels += (text_ids if role == "gpt" else [IGNORE] * len(text_ids)) + [IGNORE] * len(nl_ids)
        if i == 1:  # the first human message (after the system message)
            insert_pos = len(expected_ids)

    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist() == expected_labels
    assert sample.insert_pos == insert_pos
    # the system message stays before the latent block
    system_ids = _ids(tokenizer, MULTI_TURN[0][1] + "\n")
    assert sample.insert_pos > len(system_ids)
    assert (
        _decode(tokenizer, sample.input_ids[: sample.insert_pos]) == MULTI_TURN[0][1] + "\n" + MULTI_TURN[1][1] + "\n"
    )
    # supervised tokens are exactly the two assistant texts, in order
    supervised = sample.labels[sample.labels != IGNORE]
    assert _decode(tokenizer, supervised) == MULTI_TURN[2][1] + MULTI_TURN[4][1]
    assert (sample.input_ids[sample.labels != IGNORE] == supervised).all()
    assert sample.input_ids.dtype == np.int32 and sample.labels.dtype == np.int64  # compact storage


def test_plain_insert_pos_without_system_message(tokenizer, student_tokenizer):
    msgs = MULTI_TURN[1:]
    sample = _encode(_conversation(*msgs), tokenizer, student_tokenizer)
    assert sample.insert_pos == len(_ids(tokenizer, msgs[0][1])) + len(_ids(tokenizer, "\n"))
    # the token right after the block position is the first assistant token, and it is supervised
    assert sample.labels[sample.insert_pos] == sample.input_ids[sample.insert_pos]
    assert (sample.labels[: sample.insert_pos] == IGNORE).all()


def test_user_and_assistant_role_names_equal_human_and_gpt(tokenizer, student_tokenizer):
    alias = {"system": "System", "human": "user", "gpt": "ASSISTANT"}
    a = _encode(_conversation(*MULTI_TURN), tokenizer, student_tokenizer)
    b = _encode(_conversation(*[(alias[r], t) for r, t in MULTI_TURN]), tokenizer, student_tokenizer)
    assert a.input_ids.tolist() == b.input_ids.tolist()
    assert a.labels.tolist() == b.labels.tolist()
    assert a.insert_pos == b.insert_pos
    assert a.student_input_ids.tolist() == b.student_input_ids.tolist()
    for fmt in ("chat",):
        a = _encode(_conversation(*MULTI_TURN), tokenizer, student_tokenizer, conversation_format=fmt)
        b = _encode(
            _conversation(*[(alias[r], t) for r, t in MULTI_TURN]),
            tokenizer,
            student_tokenizer,
            conversation_format=fmt,
        )
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


# ----------------------------------------------------------------------------------------------------
# 2. chat rendering
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_system", [True, False])
def test_chat_rendering_prefix_labels_and_headers(tokenizer, student_tokenizer, with_system):
    msgs = MULTI_TURN if with_system else MULTI_TURN[1:]
    canon = [(CANON[r], t) for r, t in msgs]
    first_user = next(i for i, (r, _) in enumerate(canon) if r == "user")
    sample = _encode(_conversation(*msgs), tokenizer, student_tokenizer, conversation_format="chat")
    ids, labels = sample.input_ids, sample.labels

    # the whole sequence is the template rendering; the prefix ends right after the first user turn
    assert _decode(tokenizer, ids) == _template(tokenizer, canon)
    assert _decode(tokenizer, ids[: sample.insert_pos]) == _template(tokenizer, canon[: first_user + 1])
    if with_system:
        assert _decode(tokenizer, ids[: sample.insert_pos]).startswith("<|im_start|>system\n" + msgs[0][1])

    # supervised tokens: each assistant content followed by the <|im_end|> closing its turn, nothing else
    supervised = labels != IGNORE
    assert (labels[supervised] == ids[supervised]).all()
    assistant_texts = [t for r, t in canon if r == "assistant"]
    runs = _runs(supervised)
    assert [_decode(tokenizer, ids[s:e]) for s, e in runs] == [t + IM_END for t in assistant_texts]
    assert _decode(tokenizer, labels[supervised]) == "".join(t + IM_END for t in assistant_texts)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for s, e in runs:
        assert ids[e - 1] == im_end_id
        # "<|im_start|>assistant\n" right before the content is unsupervised, the "\n" after is too
        header = _ids(tokenizer, "<|im_start|>assistant\n")
        assert ids[s - len(header) : s].tolist() == header
        assert (labels[s - len(header) : s] == IGNORE).all()
        assert labels[e] == IGNORE and _decode(tokenizer, ids[e : e + 1]) == "\n"
    assert not (labels[ids == im_start_id] != IGNORE).any()
    # only the im_end tokens that close assistant turns are supervised
    assert int(((ids == im_end_id) & supervised).sum()) == len(assistant_texts)


# ----------------------------------------------------------------------------------------------------
# 3. truncation to --model_max_length
# ----------------------------------------------------------------------------------------------------


def test_truncation_cuts_from_the_end(tokenizer, student_tokenizer):
    conv = _conversation(*MULTI_TURN)
    K = 4
    full = _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=4096)
    assert len(full.input_ids) + K + 2 < 4096
    max_len = full.insert_pos + 8 + K + 2
    assert max_len - K - 2 < len(full.input_ids)
    cut = _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=max_len)
    assert len(cut.input_ids) == max_len - K - 2 == len(cut.labels)
    assert cut.input_ids.tolist() == full.input_ids[: max_len - K - 2].tolist()
    assert cut.labels.tolist() == full.labels[: max_len - K - 2].tolist()
    assert cut.insert_pos == full.insert_pos
    # a long enough bound keeps everything
    exact = _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=len(full.input_ids) + K + 2)
    assert exact.input_ids.tolist() == full.input_ids.tolist()


def test_truncation_first_user_message_not_fitting_is_unusable(tokenizer, student_tokenizer):
    conv = _conversation(*MULTI_TURN)
    K = 4
    s = _encode(conv, tokenizer, student_tokenizer, K=K).insert_pos
    with pytest.raises(ValueError):
        _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=s + K + 1)
    with pytest.raises(ValueError):  # s fits exactly but nothing supervised remains
        _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=s + K + 2)
    ok = _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=s + K + 3)
    assert len(ok.input_ids) == s + 1 and ok.labels[-1] != IGNORE


def test_truncation_keeping_no_supervised_token_is_unusable(tokenizer, student_tokenizer):
    # the first user message fits, but a second (unsupervised) user message fills the rest
    msgs = (("human", "Put a mug in desk 1."), ("human", "On the shelf 2, you see a mug 1. " * 4), ("gpt", "Act: go"))
    conv = _conversation(*msgs)
    K = 3
    s = _encode(conv, tokenizer, student_tokenizer, K=K).insert_pos
    before_answer = s + len(_ids(tokenizer, msgs[1][1])) + len(_ids(tokenizer, "\n"))
    with pytest.raises(ValueError):
        _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=before_answer + K + 2)
    kept = _encode(conv, tokenizer, student_tokenizer, K=K, model_max_length=before_answer + 1 + K + 2)
    assert int((kept.labels != IGNORE).sum()) == 1
    assert kept.labels[-1] == _ids(tokenizer, msgs[2][1])[0]


# ----------------------------------------------------------------------------------------------------
# 4. student tokens
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_student_tokens_plan_prompt_then_head_of_conversation(tokenizer, student_tokenizer, fmt):
    conv = _conversation(*MULTI_TURN)
    prompt = "Plan the task step by step:"
    sample = _encode(conv, tokenizer, student_tokenizer, conversation_format=fmt, plan_prompt=prompt)
    head = [(CANON[r], t) for r, t in MULTI_TURN[:2]]  # system + first user message
    body = "".join(t + "\n" for _, t in head) if fmt == "plain" else _template(student_tokenizer, head)
    expected = student_tokenizer(prompt + "\n" + body)["input_ids"]
    assert sample.student_input_ids.tolist() == expected
    prefix = student_tokenizer(prompt + "\n")["input_ids"]
    assert sample.student_input_ids[: len(prefix)].tolist() == prefix
    text = _decode(student_tokenizer, sample.student_input_ids)
    assert MULTI_TURN[2][1] not in text and MULTI_TURN[3][1] not in text
    # the default plan prompt is used when none is given
    default = _encode(conv, tokenizer, student_tokenizer, conversation_format=fmt)
    assert _decode(student_tokenizer, default.student_input_ids).startswith(tlc.DEFAULT_PLAN_PROMPT + "\n")


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_student_max_length_keeps_prompt_and_end_of_conversation(tokenizer, student_tokenizer, fmt):
    conv = _conversation(*MULTI_TURN)
    head = [(CANON[r], t) for r, t in MULTI_TURN[:2]]
    body = "".join(t + "\n" for _, t in head) if fmt == "plain" else _template(student_tokenizer, head)
    prefix_ids = student_tokenizer(tlc.DEFAULT_PLAN_PROMPT + "\n")["input_ids"]
    body_ids = student_tokenizer(body, add_special_tokens=False)["input_ids"]
    assert len(body_ids) > 10

    cut = _encode(conv, tokenizer, student_tokenizer, conversation_format=fmt, student_max_length=len(prefix_ids) + 6)
    assert len(cut.student_input_ids) == len(prefix_ids) + 6
    assert cut.student_input_ids.tolist() == prefix_ids + body_ids[-6:]

    tiny = _encode(conv, tokenizer, student_tokenizer, conversation_format=fmt, student_max_length=2)
    assert tiny.student_input_ids[: len(prefix_ids)].tolist() == prefix_ids  # the plan prompt is always kept
    assert (
        tiny.student_input_ids[len(prefix_ids) :].tolist() == body_ids[-len(tiny.student_input_ids) + len(prefix_ids) :]
    )
    # teacher side is untouched by the student bound
    full = _encode(conv, tokenizer, student_tokenizer, conversation_format=fmt)
    assert cut.input_ids.tolist() == full.input_ids.tolist()


# ----------------------------------------------------------------------------------------------------
# 5. train / eval split
# ----------------------------------------------------------------------------------------------------


def test_split_train_eval():
    train, evals = tlc.split_train_eval(100, 0.2, seed=3)
    assert (train, evals) == tlc.split_train_eval(100, 0.2, seed=3)
    assert len(evals) == 20
    assert not set(train) & set(evals)
    assert sorted(train + evals) == list(range(100))
    others = [tlc.split_train_eval(100, 0.2, seed=s)[1] for s in range(4, 9)]
    assert any(o != evals for o in others)  # the seed matters

    for n, ratio in [(3, 0.01), (50, 0.001), (2, 0.1)]:
        train, evals = tlc.split_train_eval(n, ratio, seed=0)
        assert len(evals) >= 1 and len(train) >= 1 and sorted(train + evals) == list(range(n))
    assert tlc.split_train_eval(5, 0.0, seed=0) == (list(range(5)), [])
    assert tlc.split_train_eval(1, 0.0, seed=0) == ([0], [])
    with pytest.raises(tlc.LatentCommError):
        tlc.split_train_eval(1, 0.05, seed=0)
    with pytest.raises(tlc.LatentCommError):
        tlc.split_train_eval(4, 0.9, seed=0)


# ----------------------------------------------------------------------------------------------------
# 6 / 7. data latents, dataset and collator
# ----------------------------------------------------------------------------------------------------


def _save(ds_or_dict, path):
    ds_or_dict.save_to_disk(str(path))
    return str(path)


def _latent(L, H, offset):
    return (np.arange(L * H, dtype=np.float32).reshape(L, H) + offset).tolist()


def test_hidden_state_store_rows_repeat_in_order(tmp_path):
    import datasets

    H = 4
    path = _save(
        datasets.Dataset.from_dict({"task_id": ["a", "b"], "hidden_state": [_latent(3, H, 0), _latent(6, H, 100)]}),
        tmp_path / "hs",
    )
    store = tlc.HiddenStateStore(path)
    assert len(store) == 2 and store.row_of == {"a": 0, "b": 1} and store.key_column == "task_id"
    a = np.asarray(_latent(3, H, 0), dtype=np.float32)
    b = np.asarray(_latent(6, H, 100), dtype=np.float32)
    np.testing.assert_array_equal(store.read(0), a)
    got = store.latent_rows(0, 7)
    assert got.shape == (7, H) and got.dtype == np.float32
    np.testing.assert_array_equal(got, a[[0, 1, 2, 0, 1, 2, 0]])
    np.testing.assert_array_equal(store.latent_rows(1, 4), b[:4])
    np.testing.assert_array_equal(store.latent_rows(1, 6), b)


def test_hidden_state_store_splits_and_id_fallback(tmp_path):
    import datasets

    def ds(ids, offset, key="task_id"):
        return datasets.Dataset.from_dict(
            {key: ids, "hidden_state": [_latent(2, 3, offset + i) for i in range(len(ids))]}
        )

    store = tlc.HiddenStateStore(
        _save(datasets.DatasetDict({"validation": ds(["v"], 50), "train": ds(["t1", "t2"], 0)}), tmp_path / "dd1")
    )
    assert store.row_of == {"t1": 0, "t2": 1}
    np.testing.assert_array_equal(store.read(1), np.asarray(_latent(2, 3, 1), dtype=np.float32))

    store = tlc.HiddenStateStore(_save(datasets.DatasetDict({"test": ds(["x"], 7)}), tmp_path / "dd2"))
    assert store.row_of == {"x": 0}
    np.testing.assert_array_equal(store.read(0), np.asarray(_latent(2, 3, 7), dtype=np.float32))

    two = _save(datasets.DatasetDict({"alpha": ds(["x"], 0), "beta": ds(["y"], 0)}), tmp_path / "dd3")
    with pytest.raises(tlc.LatentCommError) as err:
        tlc.HiddenStateStore(two)
    assert "alpha" in str(err.value) and "beta" in str(err.value)

    # `id` column (integers) when there is no `task_id`; compared with conversation ids as strings
    store = tlc.HiddenStateStore(_save(ds([3, 11], 0, key="id"), tmp_path / "ids"))
    assert store.row_of == {"3": 0, "11": 1}
    problems = tlc.ProblemLog()
    convs = tlc.parse_conversations(
        [
            {"id": i, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            for i in (11, "3", 5)
        ],
        problems,
    )
    kept = tlc.check_hidden_states(convs, store, 3, problems)
    assert [c.id for c in kept] == ["11", "3"]
    assert problems.bad_ids() == {"5"}
    assert "Sample is missing 'hidden_state'" in problems.summary()

    with pytest.raises(tlc.LatentCommError):
        tlc.HiddenStateStore(str(tmp_path / "does-not-exist"))


def test_check_hidden_states_flags_each_problem(tmp_path):
    import datasets

    H = 4
    hs = {
        "good": _latent(2, H, 0),
        "empty": [],
        "wide": _latent(2, H + 1, 0),
        "nan": [[0.0, float("nan"), 1.0, 2.0]],
        "inf": [[0.0, float("inf"), 1.0, 2.0]],
    }
    store = tlc.HiddenStateStore(
        _save(datasets.Dataset.from_dict({"task_id": list(hs), "hidden_state": list(hs.values())}), tmp_path / "hs")
    )
    convs = [tlc.Conversation(i, [("user", "q"), ("assistant", "a")]) for i in list(hs) + ["absent"]]
    problems = tlc.ProblemLog()
    kept = tlc.check_hidden_states(convs, store, H, problems)
    assert [c.id for c in kept] == ["good"]
    assert problems.bad_ids() == {"empty", "wide", "nan", "inf", "absent"}


def test_dataset_and_collator(tmp_path, tokenizer, student_tokenizer):
    import datasets

    H, K = 4, 5
    path = _save(
        datasets.Dataset.from_dict({"task_id": ["a", "b"], "hidden_state": [_latent(2, H, 0), _latent(7, H, 50)]}),
        tmp_path / "hs",
    )
    store = tlc.HiddenStateStore(path)
    long_conv = _conversation(*MULTI_TURN, record_id="a")
    short_conv = _conversation(("human", "Go."), ("gpt", "OK"), record_id="b")
    samples = [
        tlc.encode_conversation(long_conv, store.row_of["a"], tokenizer, student_tokenizer, _data_args(), K),
        tlc.encode_conversation(short_conv, store.row_of["b"], tokenizer, student_tokenizer, _data_args(), K),
    ]
    dataset = tlc.LatentCommDataset(samples, store, K)
    assert len(dataset) == 2
    item = dataset[1]
    assert item["data_latents"].shape == (K, H) and item["data_latents"].dtype == torch.float32
    np.testing.assert_array_equal(item["data_latents"].numpy(), np.asarray(_latent(7, H, 50), dtype=np.float32)[:K])
    np.testing.assert_array_equal(
        dataset[0]["data_latents"].numpy(), np.asarray(_latent(2, H, 0), dtype=np.float32)[[0, 1, 0, 1, 0]]
    )

    t_pad, s_pad = 0, 3
    batch = tlc.LatentCommCollator(teacher_pad_id=t_pad, student_pad_id=s_pad)([dataset[0], dataset[1]])
    n = [len(s.input_ids) for s in samples]
    m = [len(s.student_input_ids) for s in samples]
    T, S = max(n), max(m)
    assert n[0] != n[1] and m[0] != m[1]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, T)
    assert batch["student_input_ids"].shape == batch["student_attention_mask"].shape == (2, S)
    assert batch["data_latents"].shape == (2, K, H)
    for b, sample in enumerate(samples):
        # teacher: right padding, labels -100 on pads
        assert batch["input_ids"][b, : n[b]].tolist() == sample.input_ids.tolist()
        assert (batch["input_ids"][b, n[b] :] == t_pad).all()
        assert batch["labels"][b, : n[b]].tolist() == sample.labels.tolist()
        assert (batch["labels"][b, n[b] :] == IGNORE).all()
        assert batch["attention_mask"][b].tolist() == [1] * n[b] + [0] * (T - n[b])
        # student: left padding
        assert batch["student_input_ids"][b, S - m[b] :].tolist() == sample.student_input_ids.tolist()
        assert (batch["student_input_ids"][b, : S - m[b]] == s_pad).all()
        assert batch["student_attention_mask"][b].tolist() == [0] * (S - m[b]) + [1] * m[b]
    assert batch["insert_pos"].tolist() == [s.insert_pos for s in samples]
    for key in ("input_ids", "labels", "attention_mask", "insert_pos", "student_input_ids", "student_attention_mask"):
        assert batch[key].dtype == torch.long, key
    torch.testing.assert_close(batch["data_latents"][0], dataset[0]["data_latents"])
    torch.testing.assert_close(batch["data_latents"][1], dataset[1]["data_latents"])


# ----------------------------------------------------------------------------------------------------
# 9 / 10. arguments and config files
# ----------------------------------------------------------------------------------------------------

REQUIRED = lambda a: [  # noqa: E731
    "--teacher_model_name_or_path",
    a["teacher"],
    "--student_model_name_or_path",
    a["student"],
    "--data_path",
    a["data"],
    "--hf_hidden_repo",
    a["hidden_states"],
]


def test_parse_args_missing_required_arguments(assets):
    with pytest.raises(tlc.LatentCommError) as err:
        tlc.parse_args(["--teacher_model_name_or_path", "t", "--student_model_name_or_path", "s"])
    assert str(err.value) == "Missing required arguments: --data_path, --hf_hidden_repo"
    with pytest.raises(tlc.LatentCommError) as err:
        tlc.parse_args(["--data_path", "d.json"])
    assert (
        str(err.value)
        == "Missing required arguments: --teacher_model_name_or_path, --student_model_name_or_path, --hf_hidden_repo"
    )
    with pytest.raises(tlc.LatentCommError) as err:
        tlc.parse_args([])
    assert str(err.value) == "Missing required arguments: " + ", ".join("--" + n for n in tlc.REQUIRED_ARGUMENTS)


def test_parse_args_with_all_required_arguments(assets, tmp_path):
    # Regression: the missing-arguments check once looked every required name up on *both* ModelArguments
    # and DataArguments, so every run without --demo failed with "Missing required arguments: ...".
    model_args, data_args, latent_args, training_args = tlc.parse_args(
        REQUIRED(assets) + ["--K", "6", "--output_dir", str(tmp_path / "out")]
    )
    assert model_args.teacher_model_name_or_path == assets["teacher"]
    assert model_args.student_model_name_or_path == assets["student"]
    assert data_args.data_path == assets["data"] and data_args.hf_hidden_repo == assets["hidden_states"]
    assert latent_args.K == 6


def test_parse_args_eval_ratio_zero_switches_evaluation_off(assets, tmp_path):
    # Regression: a full "probe" parse once ran TrainingArguments validation with eval_strategy still at
    # "steps" and load_best_model_at_end True, so `--eval_ratio 0 --save_strategy no` died with a
    # ValueError (a traceback in the CLI) before the eval flags were switched off.
    _, data_args, _, training_args = tlc.parse_args(
        REQUIRED(assets) + ["--eval_ratio", "0", "--save_strategy", "no", "--output_dir", str(tmp_path / "out")]
    )
    assert data_args.eval_ratio == 0
    assert str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "no"
    assert training_args.load_best_model_at_end is False


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_with_overriding_flag(assets, tmp_path, suffix):
    config = {
        "teacher_model_name_or_path": assets["teacher"],
        "student_model_name_or_path": assets["student"],
        "data_path": assets["data"],
        "hf_hidden_repo": assets["hidden_states"],
        "K": 6,
        "conversation_format": "chat",
        "learning_rate": 2e-5,
        "student_max_length": 77,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(config))
    else:
        path.write_text(json.dumps(config))
    model_args, data_args, latent_args, training_args = tlc.parse_args([str(path), "--K", "9"])
    assert latent_args.K == 9  # the flag after the file wins
    assert data_args.conversation_format == "chat"
    assert data_args.student_max_length == 77
    assert math.isclose(training_args.learning_rate, 2e-5)
    assert model_args.teacher_model_name_or_path == assets["teacher"]
    assert data_args.hf_hidden_repo == assets["hidden_states"]


def test_config_file_unknown_key_and_demo_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("K: 4\nnot_a_flag: 1\n")
    with pytest.raises(tlc.LatentCommError) as err:
        tlc.parse_args([str(bad)])
    assert "not_a_flag" in str(err.value)
    # a demo config (no required arguments needed): file values beat demo defaults, flags beat the file
    demo = tmp_path / "demo.yaml"
    demo.write_text(f"demo: true\nK: 5\nstudent_max_length: 50\noutput_dir: {tmp_path / 'out'}\n")
    _, data_args, latent_args, _ = tlc.parse_args([str(demo), "--K", "3"])
    assert latent_args.K == 3 and data_args.student_max_length == 50 and data_args.demo


def test_config_file_invalid_yaml_is_a_latent_comm_error(tmp_path):
    # yaml.YAMLError is not a ValueError: it must still become a one-line LatentCommError.
    bad = tmp_path / "broken.yaml"
    bad.write_text("K: [1, 2\nfoo: : bar\n")
    with pytest.raises(tlc.LatentCommError):
        tlc.parse_args([str(bad)])


# ----------------------------------------------------------------------------------------------------
# 8. validation through the CLI: one line on stderr, exit status 2, before any weights load
# ----------------------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


def _assert_one_line_error(rc, stderr):
    assert "Traceback" not in stderr, stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    assert rc == 2, (rc, stderr)
    return lines[0]


@pytest.fixture(scope="module")
def broken_models(assets, tmp_path_factory):
    """Copies of the tiny teacher and student with config and tokenizer but no loadable weights."""
    root = tmp_path_factory.mktemp("broken_models")
    paths = {}
    for name in ("teacher", "student"):
        dst = root / name
        shutil.copytree(assets[name], dst)
        weights = list(dst.glob("*.safetensors")) + list(dst.glob("*.bin"))
        assert weights
        for w in weights:
            w.unlink()
        paths[name] = str(dst)
    return paths


@pytest.fixture(scope="module")
def base_data(assets):
    import datasets

    records = json.loads(Path(assets["data"]).read_text())
    ds = datasets.load_from_disk(assets["hidden_states"])
    return records, list(ds["task_id"]), [np.asarray(h, dtype=np.float32).tolist() for h in ds["hidden_state"]]


def _write_case(root, base_data, case):
    """Write the data file and latents of one bad-input case; returns (data_path, hidden_dir, expected words).

    Expected words are looked for in the error line with the data path blanked out, so that e.g. a width
    of 32 cannot match a temporary directory name; ("raw", word) is looked for in the line as it is.
    """
    import datasets

    records, ids, hidden = copy.deepcopy(base_data)
    root.mkdir(parents=True, exist_ok=True)
    data_path, hidden_dir = root / "conversations.json", root / "hidden"
    expected = []
    if case == "duplicate_id":
        records[5]["id"] = records[4]["id"]
        expected = [records[4]["id"], "duplicate"]
    elif case == "missing_latent":
        extra = json.loads(json.dumps(records[0]))
        extra["id"] = "task-extra"
        records.append(extra)
        expected = ["task-extra", "Sample is missing 'hidden_state'"]
    elif case == "wrong_width":
        hidden[3] = [row[:32] for row in hidden[3]]
        expected = [records[3]["id"], "32"]
    elif case == "empty_latent":
        hidden[4] = []
        expected = [records[4]["id"], "empty"]
    elif case == "nan_latent":
        hidden[6][1][5] = float("nan")
        expected = [records[6]["id"], "finite"]
    elif case == "unknown_role":
        records[2]["conversations"][1]["from"] = "robot"
        expected = [records[2]["id"], "robot"]
    elif case == "no_user_turn":
        records[7]["conversations"] = [{"from": "system", "value": "s"}, {"from": "gpt", "value": "Act: look"}]
        expected = [records[7]["id"], "user"]
    elif case == "no_assistant_after_user":
        records[8]["conversations"] = [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Go to desk 1."}]
        expected = [records[8]["id"], "assistant"]
    elif case == "unusable_after_truncation":  # run with --model_max_length 128 --K 4
        records[9]["conversations"][0]["value"] = "You are in the middle of a room. " * 40
        expected = [records[9]["id"]]
    elif case == "several_problems":
        records[1]["id"] = records[0]["id"]
        records[3]["conversations"][0]["from"] = "narrator"
        hidden[10] = [row[:10] for row in hidden[10]]
        expected = [records[0]["id"], records[3]["id"], records[10]["id"], "narrator"]
    datasets.Dataset.from_dict({"task_id": ids, "hidden_state": hidden}).save_to_disk(str(hidden_dir))
    if case == "invalid_json":
        data_path.write_text('[{"id": "task-0", "conversations": [')
        expected = [("raw", data_path.name)]
    elif case == "nonexistent_data":
        data_path = root / "no_such_file.json"
        expected = [("raw", data_path.name)]
    elif case == "jsonl_bad_line":
        data_path = root / "conversations.jsonl"
        data_path.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n{not json\n")
        expected = [("raw", data_path.name)]
    else:
        data_path.write_text(json.dumps(records))
    return str(data_path), str(hidden_dir), expected


CLI_CASES = [
    "duplicate_id",
    "missing_latent",
    "wrong_width",
    "empty_latent",
    "nan_latent",
    "unknown_role",
    "no_user_turn",
    "no_assistant_after_user",
    "invalid_json",
    "nonexistent_data",
]
INPROCESS_CASES = ["several_problems", "unusable_after_truncation", "jsonl_bad_line", "duplicate_id", "missing_latent"]
SHORT_RUN = [
    "--max_steps",
    "1",
    "--eval_ratio",
    "0",
    "--K",
    "4",
    "--model_max_length",
    "256",
    "--save_strategy",
    "no",
    "--use_cpu",
    "--report_to",
    "none",
]


def _assert_words(words, line, message):
    """Each expected word is in the message with the data path blanked out (or, for ("raw", word), in the line)."""
    for word in words:
        text = line if isinstance(word, tuple) else message
        word = word[1] if isinstance(word, tuple) else word
        assert word.lower() in text.lower(), (word, line)


def _argv(models, data_path, hidden_dir, out_dir, extra=()):
    return [
        "--teacher_model_name_or_path",
        models["teacher"],
        "--student_model_name_or_path",
        models["student"],
        "--data_path",
        data_path,
        "--hf_hidden_repo",
        hidden_dir,
        "--output_dir",
        out_dir,
        *extra,
    ]


# Runs `main` once per case in one process, each case's stdout and stderr captured at the file descriptors (all
# that the process writes there, from Python or not), as separate processes would show them: a process per case
# spent ~7 s of a 2-core machine on imports each, for errors that come before any weights load.
CASES_DRIVER = """
import json, os, sys, traceback
sys.path.insert(0, {repo!r})
import train_latent_comm as tlc

results = {{}}
for name, argv, out_path, err_path in json.loads(open(sys.argv[1]).read()):
    saved = os.dup(1), os.dup(2)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = tlc.main(argv)
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    results[name] = code
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def cli_results(assets, base_data, broken_models, tmp_path_factory):
    """Every validation case through `main` with its own stdout and stderr, in one process; beside it, in a
    fresh process of its own, the run that skips an invalid record and trains one step."""
    root = tmp_path_factory.mktemp("cli")
    jobs, expected = {}, {}
    for case in CLI_CASES:
        data_path, hidden_dir, words = _write_case(root / case, base_data, case)
        expected[case] = (words, data_path)
        jobs[case] = _argv(broken_models, data_path, hidden_dir, str(root / case / "out"))
    # control: valid data with the weightless copies must fail at weight loading (so the cases above prove
    # that validation runs first)
    jobs["control_broken_weights"] = _argv(
        broken_models, assets["data"], assets["hidden_states"], str(root / "control")
    )
    jobs["missing_args"] = [
        "--teacher_model_name_or_path",
        assets["teacher"],
        "--student_model_name_or_path",
        assets["student"],
    ]
    cases = [[name, argv, str(root / f"{name}.out"), str(root / f"{name}.err")] for name, argv in jobs.items()]
    (root / "cases.json").write_text(json.dumps(cases))
    driver = root / "driver.py"
    driver.write_text(CASES_DRIVER.format(repo=str(Path(SCRIPT).parent)))
    # one bad record among good ones, dropped with a warning; real weights, one optimizer step
    skip_data, skip_hidden, _ = _write_case(root / "skip", base_data, "unknown_role")
    skip_argv = _argv(assets, skip_data, skip_hidden, str(root / "skip" / "out"), ["--skip_invalid_samples", *SHORT_RUN])

    def start(command):
        return subprocess.Popen(command, cwd=str(root), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip

    processes = start([sys.executable, str(driver), str(root / "cases.json")]), start([sys.executable, SCRIPT, *skip_argv])
    (driver_out, driver_err), skip_output = (process.communicate(timeout=600) for process in processes)
    assert processes[0].returncode == 0, driver_err[-3000:]
    codes = json.loads(driver_out.splitlines()[-1])
    results = {name: (codes[name], Path(out).read_text(), Path(err).read_text()) for name, _, out, err in cases}
    results["skip_invalid"] = (processes[1].returncode, *skip_output)
    return results, expected


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_validation_error_is_one_line_before_weights(cli_results, case):
    results, expected = cli_results
    rc, _, stderr = results[case]
    line = _assert_one_line_error(rc, stderr)
    words, data_path = expected[case]
    message = line.replace(data_path, "<data>")
    _assert_words(words, line, message)
    assert "cannot load models" not in line


def test_cli_control_weightless_models_fail_at_loading(cli_results):
    rc, _, stderr = cli_results[0]["control_broken_weights"]
    assert rc != 0
    assert re.search(r"model|weight|safetensors", stderr, re.IGNORECASE), stderr
    assert "invalid" not in stderr and "Missing required" not in stderr, stderr


def test_cli_skip_invalid_samples_drops_record_and_trains(cli_results):
    rc, stdout, stderr = cli_results[0]["skip_invalid"]
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr
    warnings = [line for line in (stdout + stderr).splitlines() if "WARNING" in line.upper() and "task-2" in line]
    assert warnings, stdout + stderr


def test_cli_missing_required_arguments(cli_results):
    rc, _, stderr = cli_results[0]["missing_args"]
    assert rc != 0
    assert "Traceback" not in stderr
    assert _error_lines(stderr) == ["error: Missing required arguments: --data_path, --hf_hidden_repo"], stderr


@pytest.mark.parametrize("case", INPROCESS_CASES)
def test_main_in_process_validation_errors(case, base_data, broken_models, tmp_path, capsys):
    data_path, hidden_dir, words = _write_case(tmp_path / case, base_data, case)
    capsys.readouterr()  # drop the progress output of writing the case
    extra = ["--model_max_length", "128", "--K", "4"] if case == "unusable_after_truncation" else []
    rc = tlc.main(_argv(broken_models, data_path, hidden_dir, str(tmp_path / "out"), extra))
    err = capsys.readouterr().err
    line = _assert_one_line_error(rc, err)
    message = line.replace(data_path, "<data>")
    _assert_words(words, line, message)
    assert not (tmp_path / "out" / tlc.RUN_ARGS_NAME).exists()


def test_main_in_process_unreadable_hidden_repo(assets, broken_models, tmp_path, capsys):
    rc = tlc.main(_argv(broken_models, assets["data"], str(tmp_path / "no_such_dataset"), str(tmp_path / "out")))
    _assert_one_line_error(rc, capsys.readouterr().err)


def test_student_without_tokenizer_uses_the_teachers(assets, tmp_path):
    import shutil

    student_dir = tmp_path / "student"
    shutil.copytree(assets["student"], student_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (student_dir / name).unlink(missing_ok=True)
    teacher_tok, student_tok, _ = tlc.build_tokenizers(
        tlc.ModelArguments(assets["teacher"], str(student_dir)), tlc.DataArguments()
    )
    assert "<bop>" in teacher_tok.get_vocab() and "<bop>" not in student_tok.get_vocab()
    text = "Please generate a concise plan to solve this task:\nput a mug in coffeemachine 1"
    assert student_tok(text)["input_ids"] == tlc.AutoTokenizer.from_pretrained(assets["teacher"])(text)["input_ids"]


def test_teacher_without_tokenizer_files_is_a_clear_error(assets, tmp_path):
    import shutil

    teacher_dir = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (teacher_dir / name).unlink(missing_ok=True)
    with pytest.raises(tlc.LatentCommError, match="teacher tokenizer"):
        tlc.build_tokenizers(tlc.ModelArguments(str(teacher_dir), assets["student"]), tlc.DataArguments())


@pytest.mark.parametrize("storage", ["array2d_float16", "nested_lists_float64"])
def test_hidden_state_storage_formats_read_as_float32(tmp_path, storage):
    import datasets

    rng = np.random.default_rng(0)
    states = [rng.standard_normal((3, 8)), rng.standard_normal((3, 8))]
    if storage == "array2d_float16":
        features = datasets.Features(
            {"task_id": datasets.Value("string"), "hidden_state": datasets.Array2D((3, 8), "float16")}
        )
        data = {"task_id": ["a", "b"], "hidden_state": [s.astype(np.float16) for s in states]}
        expected = [s.astype(np.float16).astype(np.float32) for s in states]
    else:
        features = None
        data = {"task_id": ["a", "b"], "hidden_state": [s.tolist() for s in states]}
        expected = [s.astype(np.float32) for s in states]
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "h"))
    store = tlc.HiddenStateStore(str(tmp_path / "h"))
    for key, want in zip(("a", "b"), expected):
        got = store.read(store.row_of[key])
        assert got.dtype == np.float32 and got.shape == (3, 8)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(store.latent_rows(store.row_of[key], 5), want[[0, 1, 2, 0, 1]], rtol=1e-6)


def test_chat_template_failure_is_a_per_record_problem(assets, tmp_path):
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(assets["teacher"])
    # A template that, like some real ones, refuses conversations that do not open with a user or system turn.
    strict.chat_template = (
        "{% if messages and messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}"
        "{% endif %}" + tlc.CHATML_TEMPLATE
    )
    conv = _conversation(("gpt", "Hello."), ("human", "Go."), ("gpt", "OK"), record_id="opens-with-assistant")
    with pytest.raises(ValueError, match="chat template"):
        tlc.encode_conversation(conv, 0, strict, strict, tlc.DataArguments(conversation_format="chat"), 4)


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_parallel_tokenization_equals_serial(assets, tokenizer, fmt):
    from types import SimpleNamespace

    records = json.loads(Path(assets["data"]).read_text())
    many = [{**copy.deepcopy(r), "id": f"{r['id']}-{i}"} for i in range(20) for r in records]  # 240 records
    many[7]["conversations"][0]["value"] = "word " * 400  # unusable at this length: a problem in both runs
    conversations = tlc.parse_conversations(many, tlc.ProblemLog())
    store = SimpleNamespace(row_of={c.id: i for i, c in enumerate(conversations)})
    results = {}
    for workers in (None, 3):
        data_args = tlc.DataArguments(conversation_format=fmt, model_max_length=300, preprocessing_num_workers=workers)
        problems = tlc.ProblemLog()
        samples = tlc.encode_conversations(conversations, store, tokenizer, tokenizer, data_args, 8, problems)
        results[workers] = (samples, problems.by_kind)
    (serial, serial_problems), (parallel, parallel_problems) = results[None], results[3]
    assert serial_problems == parallel_problems and many[7]["id"] in str(serial_problems)
    assert len(serial) == len(parallel) == len(conversations) - 1
    for a, b in zip(serial, parallel):
        assert (a.record_id, a.hidden_row, a.insert_pos) == (b.record_id, b.hidden_row, b.insert_pos)
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
        assert a.student_input_ids.tolist() == b.student_input_ids.tolist()


# ----------------------------------------------------------------------------------------------------
# 9. flags and paths checked before anything loads, all problems in one line
# ----------------------------------------------------------------------------------------------------

BAD_NUMBERS = {
    "learning_rate": "-1e-3",
    "weight_decay": "-0.1",
    "adam_beta1": "1.0",
    "adam_beta2": "-0.5",
    "adam_epsilon": "-1e-8",
    "max_grad_norm": "-1",
    "per_device_train_batch_size": "0",
    "per_device_eval_batch_size": "0",
    "gradient_accumulation_steps": "0",
    "dataloader_num_workers": "-1",
    "early_stopping_patience": "-1",
    "early_stopping_threshold": "-0.5",
    "skip_nonfinite_batches": "-2",
    "preprocessing_num_workers": "0",
}


def _must_not_load(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loading started")

    monkeypatch.setattr(tlc, "build_tokenizers", must_not_run)
    monkeypatch.setattr(tlc, "build_demo_assets", must_not_run)


def test_out_of_range_numbers_are_all_named_in_one_line_before_loading(assets, tmp_path, monkeypatch, capsys):
    _must_not_load(monkeypatch)
    flags = [arg for name, value in BAD_NUMBERS.items() for arg in (f"--{name}", value)]
    argv = REQUIRED(assets) + ["--output_dir", str(tmp_path / "out"), *flags, "--num_train_epochs", "0"]
    assert tlc.main(argv) == 2
    line = _assert_one_line_error(2, capsys.readouterr().err)
    for name in BAD_NUMBERS:
        assert f"--{name} must be" in line, name
    assert "nothing to train" in line
    # argparse's own errors are one line too, not the usage of every flag.
    assert tlc.main(REQUIRED(assets) + ["--K", "abc"]) == 2
    line = _assert_one_line_error(2, capsys.readouterr().err)
    assert line == "error: argument --K: invalid int value: 'abc' (see --help)"
    # The edges stay valid: a zero learning rate, clipping off, no weight decay.
    args = tlc.parse_args(REQUIRED(assets) + ["--learning_rate", "0", "--max_grad_norm", "0", "--weight_decay", "0"])
    assert args[3].learning_rate == 0


@pytest.mark.parametrize("value", ["./models/teachr", "../teachr", "/no/such/teachr", "~/no/such/teachr", "a/b/c"])
def test_a_missing_local_path_is_no_such_directory_online_or_offline(value, monkeypatch):
    for offline in ("1", "0"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", offline)
        problem = tlc.hub_or_local_problem("--teacher_model_name_or_path", value, "model")
        assert problem == f"--teacher_model_name_or_path {value}: no such local directory"


def test_org_name_is_a_hub_id_online_and_must_be_cached_offline(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var)
    assert tlc.hub_or_local_problem("--teacher_model_name_or_path", "org/teachr", "model") is None
    assert tlc.hub_or_local_problem("--hf_hidden_repo", "org/hidden", "dataset") is None
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert tlc.hub_or_local_problem("--teacher_model_name_or_path", "org/teachr", "model") == (
        "--teacher_model_name_or_path org/teachr: no such local directory, and not in the Hugging Face cache "
        "(TRANSFORMERS_OFFLINE is set, so the Hub is not asked)"
    )
    assert "HF_DATASETS_OFFLINE is set" in tlc.hub_or_local_problem("--hf_hidden_repo", "org/hidden", "dataset")
    (tmp_path / "hub" / "models--org--teachr").mkdir(parents=True)  # downloaded before going offline
    (tmp_path / "datasets" / "org___hidden").mkdir(parents=True)
    assert tlc.hub_or_local_problem("--teacher_model_name_or_path", "org/teachr", "model") is None
    assert tlc.hub_or_local_problem("--hf_hidden_repo", "org/hidden", "dataset") is None


def test_mistyped_paths_stop_at_once_in_one_line(assets, tmp_path, monkeypatch, capsys):
    _must_not_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher_file").write_text("")
    argv = [
        "--teacher_model_name_or_path", "./models/teachr", "--student_model_name_or_path", "teacher_file",
        "--data_path", "data/convs.json", "--hf_hidden_repo", str(tmp_path),
        "--hidden_head_ckpt", "head.safetensors", "--resume_from_checkpoint", "out/checkpoint-9",
        "--output_dir", "teacher_file",
    ]  # fmt: skip
    assert tlc.main(argv) == 2
    line = _assert_one_line_error(2, capsys.readouterr().err)
    assert line == (
        "error: --teacher_model_name_or_path ./models/teachr: no such local directory; "
        "--student_model_name_or_path teacher_file is a file; expected a directory; "
        "--data_path data/convs.json: no such file; --hidden_head_ckpt head.safetensors: no such file; "
        "--resume_from_checkpoint out/checkpoint-9 does not exist; --output_dir teacher_file is a file, not a directory"
    )


def test_every_record_invalid_says_none_is_usable_instead_of_suggesting_to_skip(
    assets, base_data, broken_models, tmp_path, capsys
):
    records = copy.deepcopy(base_data[0])
    for record in records:
        record["conversations"][1]["from"] = "robot"
    data_path = tmp_path / "all_bad.json"
    data_path.write_text(json.dumps(records))
    for extra in ([], ["--skip_invalid_samples"]):
        rc = tlc.main(_argv(broken_models, str(data_path), assets["hidden_states"], str(tmp_path / "out"), extra))
        line = _assert_one_line_error(rc, capsys.readouterr().err)
        assert f"{len(records)} of {len(records)} records are invalid" in line
        assert "No record is usable (skipping the invalid ones would leave none): fix the data." in line
        assert "pass --skip_invalid_samples" not in line
