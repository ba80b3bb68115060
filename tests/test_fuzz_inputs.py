"""Odd input never crashes (issue 5, item 4): property-based tests of the data-loading path.

Hypothesis generates conversation files and hidden-state datasets with random structure: missing
fields, wrong types, empty strings, unknown roles, unicode (lone surrogates included), huge and empty
turns, wrong widths, NaN and infinite values, ragged rows, duplicate ids, non-object records and nested
junk. Loading goes through the real path: `load_records` on a file, `parse_conversations`, a dataset
written with `save_to_disk` and opened by `HiddenStateStore`, `check_hidden_states`,
`encode_conversations`, and `build_datasets` with the tiny tokenizers. It must either yield valid
samples or stop with `LatentCommError` (SPEC 1.3), and `--skip_invalid_samples` must drop exactly the
bad records. An independent oracle below says which records must survive parsing and the latent check.

The example database is off and generation is derandomized, so CI runs the same examples every time.
"""

import json
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import Features, List, Value
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import train_latent_comm as tlc

HIDDEN = 64  # the tiny teacher's hidden size (conftest `assets`)
ROLES = {"human": "user", "user": "user", "system": "system", "gpt": "assistant", "assistant": "assistant"}

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

# ----------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
texts = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "\n",
            "\n\n",
            "hello",
            "Act: go to shelf 2",
            "Think: the mug is likely on the shelf.",
            "<|im_end|>",
            "<|im_start|>assistant\n",
            "<bop>",
            "<eop>",
            "{{ raise_exception('x') }}",
            "\x00",
            "\ud800",
            "a\udfffb",
            "\u200b",
            "\ufeff",
            "日本語のテキスト",
            "🙂" * 3,
        ]
    ),
    st.text(max_size=30),
    st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=4), st.integers(300, 2000)),  # huge turns
)
role_names = st.sampled_from(["human", "user", "gpt", "assistant", "system", "Human", " GPT ", "USER\n", "robot",
                              "", "tool", "function"])  # fmt: skip
ids = st.one_of(st.sampled_from(["a", "b", "c", "1", "2", "task-3", "x\udc00"]), st.integers(0, 3), st.text(max_size=4))
turns = st.one_of(
    st.fixed_dictionaries({"from": role_names, "value": texts}),
    st.fixed_dictionaries({"from": role_names, "value": texts}),
    st.fixed_dictionaries({"role": role_names, "content": texts}),  # the OpenAI / chat-template layout
    st.fixed_dictionaries({}, optional={"from": role_names | junk, "value": texts | junk, "loss": junk}),
    st.fixed_dictionaries({}, optional={"role": role_names | junk, "content": texts | junk, "value": junk}),
    junk,
)


plain_texts = st.one_of(
    st.sampled_from(["hello", "Act: go to shelf 2", "Think: the mug is likely on the shelf.", "日本語", "🙂 ok"]),
    st.text(min_size=1, max_size=30),
)


@st.composite
def usable_looking_turns(draw, text=texts):
    """[system?] human gpt (human gpt)*: most of these are valid, so samples do come out."""
    result = [{"from": "system", "value": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        result += [{"from": draw(st.sampled_from(["human", "user", "Human"])), "value": draw(text)},
                   {"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(text)}]  # fmt: skip
    return result


conversation_lists = st.one_of(usable_looking_turns(), usable_looking_turns(), st.lists(turns, max_size=6))
records = st.one_of(
    st.fixed_dictionaries({"id": ids, "conversations": conversation_lists}, optional={"extra": junk}),
    st.fixed_dictionaries({"id": ids, "conversations": conversation_lists}),
    st.fixed_dictionaries({"id": ids, "messages": conversation_lists}),
    st.fixed_dictionaries(
        {}, optional={"id": ids | junk, "conversations": conversation_lists | junk, "messages": conversation_lists}
    ),
    junk,
)
record_lists = st.lists(records, max_size=7)


def write_records(path, items, jsonl, ensure_ascii):
    """Write records as a JSON array or JSON Lines; lone surrogates become invalid UTF-8 bytes unless escaped."""
    if jsonl:
        text = "\n".join(json.dumps(item, ensure_ascii=ensure_ascii) for item in items) + "\n"
    else:
        text = json.dumps(items, ensure_ascii=ensure_ascii, indent=1)
    Path(path).write_bytes(text.encode("utf-8", "surrogatepass"))


# A hidden-state row: (L, H, defect, seed). Most are valid; the others say what is wrong with them.
ROW_DEFECTS = ["nan", "inf", "-inf", "ragged", "null"]
valid_rows = st.tuples(st.integers(1, 5), st.just(HIDDEN), st.just("ok"), st.integers(0, 2**16))
odd_rows = st.tuples(st.integers(0, 5), st.sampled_from([HIDDEN, HIDDEN - 1, 1, 0]),
                     st.sampled_from(ROW_DEFECTS + ["ok"]), st.integers(0, 2**16))  # fmt: skip
rows = st.one_of(valid_rows, valid_rows, valid_rows, odd_rows)


def hidden_value(L, H, defect, seed):
    if defect == "null":
        return None
    values = np.random.default_rng(seed).standard_normal((L, H)).astype(np.float32)
    if defect in ("nan", "inf", "-inf") and values.size:
        values.flat[seed % values.size] = float(defect)
    values = values.tolist()
    if defect == "ragged" and L >= 2:
        values[-1] = values[-1][:-1] + [0.5, 0.5]
    return values


def hidden_row_is_valid(L, H, defect):
    """The oracle for one row of a 2-D column: what check_hidden_states must accept."""
    if defect == "null" or L < 1 or H != HIDDEN:
        return False
    if defect in ("nan", "inf", "-inf"):
        return False
    return not (defect == "ragged" and L >= 2)


# The layout of the whole dataset: mostly a plain `Dataset` with a `task_id` key and a 2-D float column.
LAYOUTS = {
    "normal": ("task_id", "2d", "dataset"),
    "id_key": ("id", "2d", "dataset"),
    "train_split": ("task_id", "2d", "train"),
    "only_split": ("task_id", "2d", "validation"),
    "two_splits": ("task_id", "2d", "two_splits"),
    "no_key_column": ("name", "2d", "dataset"),
    "no_hidden_column": ("task_id", "missing", "dataset"),
    "1d_column": ("task_id", "1d", "dataset"),
    "3d_column": ("task_id", "3d", "dataset"),
    "string_column": ("task_id", "str", "dataset"),
}


@st.composite
def hidden_stores(draw, record_ids):
    """A hidden-state dataset: a row for most records' ids (some dropped, some twice, some extra keys), a row
    spec per key, the key column's name and type, the hidden column's kind and the container."""
    keys = [str(i) for i in record_ids if draw(st.integers(0, 9)) < 9]
    keys += draw(st.lists(st.sampled_from(sorted({str(i) for i in record_ids} | {"a", "zz", "1"})), max_size=2))
    keys = draw(st.permutations([key for key in keys if _is_text(key)]))  # Arrow cannot store lone surrogates
    layout = draw(st.sampled_from(["normal"] * 10 + sorted(LAYOUTS)))
    key_column, kind, container = LAYOUTS[layout]
    return dict(
        keys=keys,
        rows=[draw(rows) for _ in keys],
        key_column=key_column,
        int_keys=draw(st.sampled_from([False, False, False, True])),
        kind=kind,
        container=container,
    )


def write_store(path, layout):
    keys, specs = layout["keys"], layout["rows"]
    if layout["int_keys"]:
        pairs = [(int(k), s) for k, s in zip(keys, specs) if k.isdigit() and len(k) < 10]
        keys, specs = [k for k, _ in pairs], [s for _, s in pairs]
    columns = {layout["key_column"]: keys, "plan": ["a plan"] * len(keys)}
    features = {layout["key_column"]: Value("int64" if layout["int_keys"] else "string"), "plan": Value("string")}
    kind = layout["kind"]
    if kind == "2d":
        columns["hidden_state"] = [hidden_value(*spec) for spec in specs]
        features["hidden_state"] = List(List(Value("float32")))
    elif kind == "1d":
        columns["hidden_state"] = [[0.5] * spec[1] for spec in specs]
        features["hidden_state"] = List(Value("float32"))
    elif kind == "3d":
        columns["hidden_state"] = [[[[0.5] * spec[1]]] for spec in specs]
        features["hidden_state"] = List(List(List(Value("float32"))))
    elif kind == "str":
        columns["hidden_state"] = ["1.5" for _ in specs]
        features["hidden_state"] = Value("string")
    dataset = datasets.Dataset.from_dict(columns, features=Features(features))
    container = layout["container"]
    if container == "train":
        dataset = datasets.DatasetDict({"train": dataset, "test": dataset})
    elif container == "validation":
        dataset = datasets.DatasetDict({"validation": dataset})
    elif container == "two_splits":
        dataset = datasets.DatasetDict({"a": dataset, "b": dataset})
    dataset.save_to_disk(str(path))
    return [str(k) for k in keys], specs


# ----------------------------------------------------------------------------------------------------
# the oracle: which records must survive parsing, independently of train_latent_comm
# ----------------------------------------------------------------------------------------------------


def _is_text(value):
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")  # lone surrogates cannot be tokenized
    except UnicodeEncodeError:
        return False
    return True


def expected_conversations(items):
    """id -> canonical messages for every record that parse_conversations must keep, in order."""
    kept, seen = {}, set()
    for item in items:
        if not isinstance(item, dict):
            continue
        raw = item.get("id")
        if isinstance(raw, bool) or not isinstance(raw, (str, int)) or raw == "":
            continue
        if str(raw) in seen:
            continue
        seen.add(str(raw))
        if "conversations" in item and "messages" in item:
            continue
        turns = item["conversations"] if "conversations" in item else item.get("messages")
        if not isinstance(turns, list):
            continue
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                break
            # a turn is {"from", "value"} when it has "from", else {"role", "content"}
            role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
            role_name, text = turn.get(role_key), turn.get(text_key)
            if not (isinstance(role_name, str) and _is_text(text)):
                break
            role = ROLES.get(role_name.strip().lower())
            if role is None:
                break
            messages.append((role, text))
        else:
            roles = [role for role, _ in messages]
            if "user" in roles and "assistant" in roles[roles.index("user") + 1 :]:
                kept[str(raw)] = messages
    return kept


def records_of_file(items, jsonl):
    """The records `load_records` must return for `items` written by `write_records` (None: an error). A JSON
    Lines file of one line holding an object is that object as a whole file: one record if it has a record's
    key, else the array under its only key, else records keyed by id."""
    if not (jsonl and len(items) == 1 and isinstance(items[0], dict)):
        return items
    (whole,) = items
    if {"id", "conversations", "messages"} & set(whole):
        return items
    if len(whole) == 1 and isinstance(next(iter(whole.values())), list):
        return next(iter(whole.values()))
    if whole and all(isinstance(v, dict) for v in whole.values()):
        if any("id" in v and str(v["id"]) != k for k, v in whole.items()):
            return None
        return [{"id": k, **v} for k, v in whole.items()]
    return None


def n_problems(problems):
    return sum(len(v) for v in problems.by_kind.values())


# ----------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["student"])


@pytest.fixture(scope="module")
def training_args(tmp_path_factory):
    return tlc.LatentTrainingArguments(output_dir=str(tmp_path_factory.mktemp("unused")), use_cpu=True, seed=3)


file_contents = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda v: json.dumps(v).encode(), junk),
    st.builds(lambda v: ("\n".join(json.dumps(x) for x in v) + "\n").encode(), st.lists(junk, max_size=4)),
    st.builds(
        lambda n, open_, close: (open_ * n + close * n).encode(),
        st.integers(1, 5000),
        st.sampled_from(["[", '{"a":']),
        st.sampled_from(["]", "}"]),
    ),  # fmt: skip
    st.builds(lambda n: b'[{"id": ' + b"7" * n + b"}]", st.integers(1, 6000)),
)


@settings(FUZZ, max_examples=300)
@given(content=file_contents, bom=st.booleans())
def test_load_records_returns_a_list_or_a_validation_error(content, bom):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "data.json")
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + content)
        try:
            loaded = tlc.load_records(str(path))
        except tlc.LatentCommError as err:
            assert str(err) and str(path) in str(err)
            return
    assert isinstance(loaded, list)


@settings(FUZZ, max_examples=300)
@given(items=record_lists)
def test_parse_conversations_keeps_exactly_the_valid_records(items):
    problems = tlc.ProblemLog()
    conversations = tlc.parse_conversations(items, problems)
    expected = expected_conversations(items)
    assert {c.id: c.messages for c in conversations} == expected
    assert [c.id for c in conversations] == list(expected)  # in file order, each id once
    # Every record is either kept or reported once: nothing is dropped silently.
    assert len(conversations) + n_problems(problems) == len(items)
    assert not set(expected) & {i for kind, ids in problems.by_kind.items() if kind != "duplicates an earlier id"
                                for i in ids}  # fmt: skip
    for conv in conversations:
        assert 0 <= conv.first_user_index < len(conv.messages)
    assert "\n" not in problems.summary() or any("\n" in str(i) for i in problems.bad_ids())
    problems.summary().encode("utf-8")  # printable to a UTF-8 stream: ids with lone surrogates come escaped


@st.composite
def clean_record_lists(draw):
    """Records that are all well-formed, with distinct ids: the path on which datasets get built."""
    conversations = draw(st.lists(usable_looking_turns(plain_texts), min_size=1, max_size=6))
    as_int = draw(st.booleans())
    return [{"id": i if as_int else f"r{i}", "conversations": c} for i, c in enumerate(conversations)]


@st.composite
def pipeline_cases(draw):
    mix = draw(st.sampled_from(["clean", "mixed", "messy"]))
    clean = draw(clean_record_lists()) if mix != "messy" else []
    messy = draw(st.lists(records, min_size=1, max_size=5)) if mix != "clean" else []
    items = draw(st.permutations(clean + messy))
    record_ids = [item["id"] for item in items if isinstance(item, dict) and isinstance(item.get("id"), (str, int))]
    K = draw(st.integers(1, 6))
    return dict(
        items=items,
        jsonl=draw(st.booleans()),
        ensure_ascii=draw(st.sampled_from([True, True, True, True, False])),
        store=draw(hidden_stores(record_ids)),
        K=K,
        conversation_format=draw(st.sampled_from(["plain", "chat"])),
        model_max_length=draw(st.sampled_from([512, 48, 4096, K + 12, K + 4])),
        student_max_length=draw(st.sampled_from([1024, 6, 1])),
        skip_invalid_samples=draw(st.booleans()),
        eval_ratio=draw(st.sampled_from([0.0, 0.0, 0.25])),
    )


def check_sample(sample, K, data_args, student_tokenizer, teacher_vocab):
    T = len(sample.input_ids)
    assert sample.input_ids.dtype == np.int32 and sample.supervised.dtype == bool
    assert sample.supervised.shape == (T,)
    assert T + K + 2 <= data_args.model_max_length
    assert 0 <= sample.insert_pos <= T
    assert sample.supervised.any() and not sample.supervised[0]
    assert ((0 <= sample.input_ids) & (sample.input_ids < teacher_vocab)).all()
    labels = sample.labels
    assert (labels[sample.supervised] == sample.input_ids[sample.supervised]).all()
    assert (labels[~sample.supervised] == tlc.IGNORE_INDEX).all()
    prefix_ids = student_tokenizer(data_args.plan_prompt + "\n")["input_ids"]
    assert 1 <= len(sample.student_input_ids) <= max(data_args.student_max_length, len(prefix_ids) + 1)
    assert list(sample.student_input_ids[: len(prefix_ids)]) == prefix_ids  # the plan prompt is always kept


@settings(FUZZ, max_examples=200)
@given(case=pipeline_cases())
def test_loading_yields_valid_samples_or_a_validation_error(case, assets, tokenizer, student_tokenizer, training_args):
    K = case["K"]
    model_args = tlc.ModelArguments(
        teacher_model_name_or_path=assets["teacher"], student_model_name_or_path=assets["student"]
    )
    latent_args = tlc.LatentArguments(K=K)
    with tempfile.TemporaryDirectory() as tmp:
        data_path, store_path = Path(tmp, "data.json"), Path(tmp, "hidden")
        write_records(data_path, case["items"], case["jsonl"], case["ensure_ascii"])
        store_keys, store_specs = write_store(store_path, case["store"])
        data_args = tlc.DataArguments(
            data_path=str(data_path), hf_hidden_repo=str(store_path),
            **{k: case[k] for k in ("conversation_format", "model_max_length", "student_max_length",
                                    "skip_invalid_samples", "eval_ratio")},
        )  # fmt: skip

        # The pieces of build_datasets, one by one, with the oracle's expectations.
        problems = tlc.ProblemLog()
        expected_items = records_of_file(case["items"], case["jsonl"])
        try:
            items = tlc.load_records(str(data_path))
        except tlc.LatentCommError:
            # Lone surrogates written as raw bytes make the file invalid UTF-8; a JSON Lines file that is empty
            # or whose first line is an array reads as (broken) JSON array.
            try:
                data_path.read_bytes().decode("utf-8")
                readable = True
            except UnicodeDecodeError:
                readable = False
            array_like = case["jsonl"] and (not case["items"] or isinstance(case["items"][0], list))
            assert not readable or array_like or expected_items is None
            event("outcome: unreadable conversations file")
            with pytest.raises(tlc.LatentCommError):
                tlc.build_datasets(model_args, data_args, latent_args, training_args, tokenizer, student_tokenizer)
            return
        if not (case["jsonl"] and isinstance(case["items"][0], list)):
            assert json.dumps(items) == json.dumps(expected_items)  # the same records (NaN != NaN)
        conversations = tlc.parse_conversations(items, problems)
        assert [c.id for c in conversations] == list(expected_conversations(items))
        layout = case["store"]
        # `datasets` cannot reload a dataset of zero rows that it saved (an IndexError): a validation error too.
        store_ok = (layout["key_column"] in ("task_id", "id") and layout["kind"] != "missing"
                    and layout["container"] != "two_splits" and len(store_keys) > 0)  # fmt: skip
        try:
            store = tlc.HiddenStateStore(str(store_path))
        except tlc.LatentCommError:
            assert not store_ok
            event("outcome: unreadable hidden states")
            with pytest.raises(tlc.LatentCommError):
                tlc.build_datasets(model_args, data_args, latent_args, training_args, tokenizer, student_tokenizer)
            return
        assert store_ok
        checked = tlc.check_hidden_states(conversations, store, HIDDEN, problems)
        valid_keys = {
            key
            for key, spec in zip(store_keys, store_specs)
            if store_keys.count(key) == 1 and layout["kind"] == "2d" and hidden_row_is_valid(*spec[:3])
        }
        assert [c.id for c in checked] == [c.id for c in conversations if c.id in valid_keys]
        samples = tlc.encode_conversations(checked, store, tokenizer, student_tokenizer, data_args, K, problems)
        assert len(samples) + n_problems(problems) == len(items)
        sample_ids = [s.record_id for s in samples]
        assert len(set(sample_ids)) == len(sample_ids)
        assert set(sample_ids) <= {c.id for c in checked}
        unusable = {i for kind, ids in problems.by_kind.items() if kind.startswith("is unusable") for i in ids}
        assert {c.id for c in checked} - set(sample_ids) == unusable
        for sample in samples:
            check_sample(sample, K, data_args, student_tokenizer, len(tokenizer))
            assert store_keys[sample.hidden_row] == sample.record_id

        # The real entry point agrees: it raises on any problem unless asked to skip, and then keeps exactly
        # the samples above (split into train and eval), each of which loads and collates.
        n_eval = max(1, round(len(samples) * case["eval_ratio"])) if case["eval_ratio"] > 0 else 0
        expect_error = (problems and not case["skip_invalid_samples"]) or not samples or n_eval >= len(samples)
        if expect_error:
            with pytest.raises(tlc.LatentCommError) as caught:
                tlc.build_datasets(model_args, data_args, latent_args, training_args, tokenizer, student_tokenizer)
            if problems and samples and not case["skip_invalid_samples"]:
                assert "invalid" in str(caught.value) and "--skip_invalid_samples" in str(caught.value)
            if problems and not samples:  # skipping cannot help: the message must not suggest it
                assert "No record is usable" in str(caught.value) and "pass --skip" not in str(caught.value)
            str(caught.value).encode("utf-8")
            event(f"outcome: validation error, {min(len(samples), 3)}+ valid samples")
            return
        train, evaluation, collator = tlc.build_datasets(
            model_args, data_args, latent_args, training_args, tokenizer, student_tokenizer
        )
        parts = [train] + ([evaluation] if evaluation is not None else [])
        assert sorted(s.record_id for part in parts for s in part.samples) == sorted(sample_ids)
        assert (evaluation is not None) == (case["eval_ratio"] > 0)
        event(f"outcome: datasets built, {min(len(samples), 3)}+ samples, {'some' if problems else 'no'} problems")
        for part in parts:
            features = [part[i] for i in range(len(part))]
            for feature in features:
                assert feature["data_latents"].shape == (K, HIDDEN)
                assert np.isfinite(feature["data_latents"].numpy()).all()
            batch = collator(features)
            assert batch["input_ids"].shape[0] == len(features)
            assert int((batch["labels"] != tlc.IGNORE_INDEX).sum()) == sum(
                int(part.samples[i].supervised.sum()) for i in range(len(part))
            )


# ----------------------------------------------------------------------------------------------------
# regressions: crashes the fuzzing found, each reduced to one input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError inside json.loads
        '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n",  # the same on a JSON Lines line
        '[{"id": ' + "7" * 5000 + ', "conversations": []}]',  # ValueError: int beyond the digit limit
    ],
    ids=["deep-array", "deep-jsonl", "huge-int"],
)
def test_load_records_reports_unparseable_json_as_a_validation_error(tmp_path, content):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(tlc.LatentCommError, match="--data_path"):
        tlc.load_records(str(path))


def test_json_lines_records_may_hold_unicode_line_separators(tmp_path):
    """U+2028, U+0085, form feed ... are line breaks for str.splitlines() but ordinary characters in JSON."""
    text = "a\u2028b\x85c\x0cd\x1ce\r"
    records = [{"id": i, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": text}]}
               for i in range(2)]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    assert tlc.load_records(str(path)) == records


def test_load_records_accepts_a_utf8_byte_order_mark(tmp_path):
    records = [{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}]
    for name, text in (("array.json", json.dumps(records)), ("lines.jsonl", json.dumps(records[0]) + "\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert tlc.load_records(str(path)) == records


def test_lone_surrogates_in_a_message_are_a_per_record_problem(tmp_path, tokenizer):
    """Valid JSON ("\\ud800" escapes) that no tokenizer can encode: reported, not a TypeError mid-tokenization."""
    good = {"id": "good", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    bad = {"id": "bad", "conversations": [{"from": "human", "value": "a\ud800"}, {"from": "gpt", "value": "ok"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, bad]))  # ensure_ascii escapes the surrogate
    problems = tlc.ProblemLog()
    conversations = tlc.parse_conversations(tlc.load_records(str(path)), problems)
    assert [c.id for c in conversations] == ["good"]
    assert problems.bad_ids() == {"bad"} and "Unicode" in problems.summary()


def test_problem_summary_escapes_lone_surrogates_in_ids():
    """An id like "x\\udc00" (valid JSON) used to make the skip warning fail inside logging on a UTF-8 stdout."""
    problems = tlc.ProblemLog()
    problems.add("Sample is missing 'hidden_state'", "x\udc00")
    assert problems.summary().encode("utf-8").decode() == "1 record: Sample is missing 'hidden_state' (ids x\\udc00)"
    assert problems.bad_ids() == {"x\udc00"}


def test_null_keys_in_the_hidden_states_match_no_record(tmp_path):
    """A missing task_id (null) must not stand in for a record whose id is the string 'None'."""
    features = Features({"task_id": Value("string"), "hidden_state": List(List(Value("float32")))})
    datasets.Dataset.from_dict(
        {"task_id": [None, "x"], "hidden_state": [[[0.5] * 3], [[0.5] * 3]]}, features=features
    ).save_to_disk(str(tmp_path / "h"))
    store = tlc.HiddenStateStore(str(tmp_path / "h"))
    conversations = [tlc.Conversation("None", [("user", "q"), ("assistant", "a")]),
                      tlc.Conversation("x", [("user", "q"), ("assistant", "a")])]  # fmt: skip
    problems = tlc.ProblemLog()
    kept = tlc.check_hidden_states(conversations, store, 3, problems)
    assert [c.id for c in kept] == ["x"]
    assert problems.bad_ids() == {"None"} and "missing 'hidden_state'" in problems.summary()
    assert "None" not in store.row_of


def test_hidden_state_store_reopens_its_memory_map_and_reads_the_same_rows(tmp_path):
    """Reopening the memory map (which bounds file-backed RSS, see tests/benchmark_memory.py) changes no value,
    also over a dataset of several shards."""
    rng = np.random.default_rng(0)
    states = [rng.standard_normal((int(rng.integers(1, 6)), 16)).astype(np.float32) for _ in range(12)]
    features = Features({"task_id": Value("string"), "hidden_state": List(List(Value("float32")))})
    dataset = datasets.Dataset.from_dict(
        {"task_id": [f"t{i}" for i in range(12)], "hidden_state": [s.tolist() for s in states]}, features=features
    )
    dataset.save_to_disk(str(tmp_path / "h"), num_shards=3)
    store = tlc.HiddenStateStore(str(tmp_path / "h"))
    assert store._remappable
    store.remap_bytes = 3 * 16 * 4  # reopen after every few rows
    tables = [store._latents]
    for _ in range(2):
        for i in rng.permutation(12):
            np.testing.assert_array_equal(store.read(store.row_of[f"t{i}"]), states[i])
            np.testing.assert_array_equal(
                store.latent_rows(store.row_of[f"t{i}"], 7), states[i][np.arange(7) % len(states[i])]
            )
            if store._latents is not tables[-1]:
                tables.append(store._latents)
    assert len(tables) > 5
