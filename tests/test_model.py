"""The student rollout, the splice, gradient flow and every loss term against slow references."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_latent_comm as tlc


def make_batch(assets, tokenizer, K, n=3, fmt="plain", max_length=512):
    records = tlc.load_records(assets["data"])
    problems = tlc.ProblemLog()
    conversations = tlc.parse_conversations(records, problems)[:n]
    store = tlc.HiddenStateStore(assets["hidden_states"])
    data_args = tlc.DataArguments(conversation_format=fmt, model_max_length=max_length)
    samples = [
        tlc.encode_conversation(c, store.row_of[c.id], tokenizer, tokenizer, data_args, K) for c in conversations
    ]
    dataset = tlc.LatentCommDataset(samples, store, K)
    collator = tlc.LatentCommCollator(tlc._pad_id(tokenizer), tlc._pad_id(tokenizer))
    return collator([dataset[i] for i in range(len(dataset))])


@pytest.fixture()
def batch(assets, tokenizer, tiny_model):
    return make_batch(assets, tokenizer, tiny_model.settings.K)


def left_padded(tokenizer, texts):
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return ids, input_ids, mask


PROMPTS = [
    "Please generate a concise plan: put a mug in coffeemachine 1",
    "short",
    "Please generate a concise plan to solve this task: take the knife from drawer 1 and go to table 1 now",
]


# ----------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------


def test_batched_rollout_equals_each_sample_alone(tiny_model, tokenizer):
    model = tiny_model.train()
    ids, input_ids, mask = left_padded(tokenizer, PROMPTS)
    batched = model.student_latents(input_ids, mask)
    assert batched.shape == (3, model.settings.K, 48)
    for b, single_ids in enumerate(ids):
        alone = model.student_latents(torch.tensor([single_ids]), torch.ones(1, len(single_ids), dtype=torch.long))
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=1e-5)


def test_cached_rollout_equals_cache_free_recomputation(tiny_model, tokenizer):
    model = tiny_model.train()
    ids, input_ids, mask = left_padded(tokenizer, PROMPTS)
    latents = model.student_latents(input_ids, mask)
    decoder = model.student.model
    for b, single_ids in enumerate(ids):
        # Recompute every step from scratch over the whole growing sequence, without any cache.
        sequence = torch.cat(
            [model.student.get_input_embeddings()(torch.tensor([single_ids])), model.lat_bos.view(1, 1, -1)], dim=1
        )
        outputs = []
        for _ in range(model.settings.K):
            last = decoder(inputs_embeds=sequence, use_cache=False).last_hidden_state[:, -1:]
            outputs.append(last)
            sequence = torch.cat([sequence, model.h2e(last)], dim=1)
        torch.testing.assert_close(torch.cat(outputs, 1)[0], latents[b], atol=1e-5, rtol=1e-5)


def _count_calls(modules):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    handles = [m.register_forward_hook(hook) for m in modules]
    return counter, handles


def test_gradient_checkpointing_keeps_rollout_context_values_and_gradients(tiny_model, tokenizer, batch):
    plain = tiny_model.train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    assert checkpointed.is_activation_checkpointing and not checkpointed.teacher.training

    results = []
    for model in (plain, checkpointed):
        attn = [layer.self_attn for layer in model.student.model.layers + model.teacher.model.layers]
        counter, handles = _count_calls(attn)
        out = model(**batch)
        calls_forward = counter["n"]
        out["loss"].backward()
        recomputed = counter["n"] - calls_forward
        for h in handles:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, recomputed))

    (out_a, grads_a, recomputed_a), (out_b, grads_b, recomputed_b) = results
    assert recomputed_a == 0
    # The student prefill (2 layers) and teacher run A (2 layers) are recomputed in the backward pass.
    assert recomputed_b >= 4
    for name in ("loss", "ce", "kl", "align"):
        torch.testing.assert_close(out_a[name], out_b[name], atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Splice and gradient flow
# ----------------------------------------------------------------------------------------------------


def test_splice_puts_block_at_insert_pos_and_shifts_the_rest():
    B, T, K, H = 3, 6, 2, 4
    tokens = torch.arange(B * T * H, dtype=torch.float32).view(B, T, H)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    block = -torch.rand(B, K + 2, H) - 1
    insert = torch.tensor([0, 4, 2])
    embeds, spliced_mask = tlc.splice_latent_block(tokens, mask, insert, block)
    assert embeds.shape == (B, T + K + 2, H)
    for b in range(B):
        s = int(insert[b])
        expected = torch.cat([tokens[b, :s], block[b], tokens[b, s:]])
        torch.testing.assert_close(embeds[b], expected)
        expected_mask = torch.cat([mask[b, :s], torch.ones(K + 2, dtype=mask.dtype), mask[b, s:]])
        assert torch.equal(spliced_mask[b], expected_mask)


def test_spliced_teacher_input_has_markers_and_latents_where_the_spec_says(tiny_model, batch):
    model = tiny_model.eval()
    K = model.settings.K
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.teacher.model.register_forward_pre_hook(grab, with_kwargs=True)
    latents = torch.randn(batch["input_ids"].shape[0], K, 64)
    model.teacher_hidden(batch["input_ids"], batch["attention_mask"], batch["insert_pos"], latents)
    handle.remove()
    emb = model.teacher.get_input_embeddings().weight
    for b in range(latents.shape[0]):
        s = int(batch["insert_pos"][b])
        got = seen["embeds"][b]
        torch.testing.assert_close(got[s], emb[model.settings.bop_id])
        torch.testing.assert_close(got[s + 1 : s + 1 + K], latents[b])
        torch.testing.assert_close(got[s + K + 1], emb[model.settings.eop_id])
        torch.testing.assert_close(got[:s], emb[batch["input_ids"][b, :s]])
        torch.testing.assert_close(got[s + K + 2 : s + K + 12], emb[batch["input_ids"][b, s : s + 10]])


def test_gradients_reach_student_bridge_and_head_never_the_teacher(tiny_model, batch):
    model = tiny_model.train()
    assert not model.teacher.training
    out = model(**batch)
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    for prefix in ("student.", "lat_bos", "h2e.", "student_proj.", "head."):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        assert params, prefix
        for name, p in params:
            assert p.grad is not None, name
        assert any(p.grad.abs().sum() > 0 for _, p in params), prefix


def _markers_case(teacher_dir, student_dir):
    from transformers import AutoModelForCausalLM

    model_args = tlc.ModelArguments(str(teacher_dir), str(student_dir))
    teacher_tok, _, new_ids = tlc.build_tokenizers(model_args, tlc.DataArguments())
    raw = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    model = tlc.build_models(
        model_args, tlc.LatentArguments(head_num_heads=4), tlc.TrainingArguments("/tmp/x"), teacher_tok, new_ids
    )
    return teacher_tok, new_ids, raw, model


def test_markers_use_spare_rows_and_start_at_the_vocabulary_mean(assets):
    from transformers import AutoTokenizer

    teacher_tok, new_ids, raw, model = _markers_case(assets["teacher"], assets["student"])
    assert teacher_tok.convert_ids_to_tokens(new_ids) == ["<bop>", "<eop>"]
    # The tokenizer's own special tokens survive the addition and keep their ids.
    original = AutoTokenizer.from_pretrained(assets["teacher"])
    assert "<|im_start|>" in original.all_special_tokens and "<|im_start|>" in teacher_tok.all_special_tokens
    assert teacher_tok("<|im_start|>", add_special_tokens=False)["input_ids"] == [
        original.convert_tokens_to_ids("<|im_start|>")
    ]
    n_original = len(teacher_tok) - 2
    for embeddings, raw_embeddings in (
        (model.teacher.get_input_embeddings(), raw.get_input_embeddings()),
        (model.teacher.get_output_embeddings(), raw.get_output_embeddings()),
    ):
        weight, raw_weight = embeddings.weight, raw_embeddings.weight
        assert weight.shape == raw_weight.shape  # the spare rows hold the markers: no resize, no shrink
        for marker_id in new_ids:
            torch.testing.assert_close(weight[marker_id], raw_weight[:n_original].mean(0))
        keep = [i for i in range(weight.shape[0]) if i not in new_ids]
        torch.testing.assert_close(weight[keep], raw_weight[keep])


def test_markers_resize_a_teacher_without_spare_rows(assets, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    exact = tlc.build_tiny_causal_lm(len(tokenizer), 64, tie=False, seed=3)
    exact.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    teacher_tok, new_ids, raw, model = _markers_case(tmp_path / "teacher", assets["student"])
    weight = model.teacher.get_input_embeddings().weight
    assert weight.shape[0] == len(teacher_tok) == len(tokenizer) + 2
    for marker_id in new_ids:
        torch.testing.assert_close(weight[marker_id], raw.get_input_embeddings().weight.mean(0))
    torch.testing.assert_close(weight[: len(tokenizer)], raw.get_input_embeddings().weight)
    assert model.teacher.get_output_embeddings().weight.shape[0] == len(teacher_tok)


def test_markers_the_tokenizer_already_has_keep_their_rows(assets, tmp_path):
    import shutil

    shutil.copytree(assets["teacher"], tmp_path / "teacher")
    with_markers, _, _ = tlc.build_tokenizers(
        tlc.ModelArguments(assets["teacher"], assets["student"]), tlc.DataArguments()
    )
    with_markers.save_pretrained(tmp_path / "teacher")
    teacher_tok, new_ids, raw, model = _markers_case(tmp_path / "teacher", assets["student"])
    assert new_ids == []
    torch.testing.assert_close(model.teacher.get_input_embeddings().weight, raw.get_input_embeddings().weight)


# ----------------------------------------------------------------------------------------------------
# Loss terms against a slow reference (full logits, Python loops)
# ----------------------------------------------------------------------------------------------------


def reference_terms(model, batch, uniform=False):
    cfg = model.settings
    K = cfg.K
    za = model.project_student_latents(
        model.student_latents(batch["student_input_ids"], batch["student_attention_mask"])
    )
    zd = model.project_data_latents(batch["data_latents"])
    emb = model.teacher.get_input_embeddings()
    bop, eop = emb.weight[cfg.bop_id], emb.weight[cfg.eop_id]
    nll, ent_b, ent_d, kls, nll_b, nll_d = [], [], [], [], [], []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        ids, labels, s = batch["input_ids"][b, :n], batch["labels"][b, :n], int(batch["insert_pos"][b])
        tokens = emb(ids)
        logits = {}
        for name, lat in (("A", za[b]), ("D", zd[b])):
            seq = torch.cat([tokens[:s], bop[None], lat, eop[None], tokens[s:]])
            logits[name] = model.teacher(inputs_embeds=seq[None]).logits[0]
        logits["B"] = model.teacher(input_ids=ids[None]).logits[0]

        def pred(t):
            return (t if t < s else t + K + 2) - 1

        targets = [t for t in range(1, n) if labels[t] != -100]
        window = [t for t in targets if s <= t < s + cfg.kl_window] or targets
        for t in targets:
            y = labels[t]
            nll.append(-F.log_softmax(logits["A"][pred(t)], -1)[y])
            nll_d.append(-F.log_softmax(logits["D"][pred(t)], -1)[y])
            nll_b.append(-F.log_softmax(logits["B"][t - 1], -1)[y])
        for t in window:
            for store, row in ((ent_b, logits["B"][t - 1]), (ent_d, logits["D"][pred(t)])):
                p = F.softmax(row.double(), -1)
                store.append(float(-(p * p.log()).sum()))
            T = cfg.kl_temperature
            p_d = F.softmax(logits["D"][pred(t)] / T, -1)
            log_p_a = F.log_softmax(logits["A"][pred(t)] / T, -1)
            kls.append(T * T * (p_d * (p_d.log() - log_p_a)).sum())
    u = np.maximum(np.array(ent_b) - np.array(ent_d), 0)
    assert (u > 0).sum() >= 3 and len(set(u.round(6))) >= 3, "the data must exercise the weights"
    if (u > 0).any():
        u = np.minimum(u, np.quantile(u[u > 0], cfg.uncertainty_quantile))
    w = torch.tensor(u / max(u.mean(), 1e-6), dtype=torch.float32)
    if uniform:
        w = torch.ones(len(kls))
    kl_stack = torch.stack(kls)
    align = (
        1 - torch.stack([F.cosine_similarity(za[b].mean(0), zd[b].mean(0), dim=0) for b in range(za.shape[0])]).mean()
    )
    return {
        "ce": torch.stack(nll).mean(),
        "kl": (w * kl_stack).sum() / (w.sum() + 1e-6),
        "align": align,
        "ce_no_latent": torch.stack(nll_b).mean(),
        "ce_data_latent": torch.stack(nll_d).mean(),
        "n_targets": len(nll),
        "n_window": len(kls),
    }


@pytest.mark.parametrize("fmt,quantile", [("plain", 0.95), ("chat", 0.95), ("plain", 0.5)])
def test_loss_terms_match_slow_reference(tiny_model, assets, tokenizer, fmt, quantile):
    model = tiny_model.eval()  # no dropout anywhere: both paths see identical latents
    model.settings.uncertainty_quantile = quantile
    batch = make_batch(assets, tokenizer, model.settings.K, fmt=fmt)
    with torch.no_grad():
        out = model(**batch)
        ref = reference_terms(model, batch)
    assert int(out["n_targets"]) == ref["n_targets"]
    for name in ("ce", "kl", "align"):
        torch.testing.assert_close(out[name].float(), ref[name].float(), atol=1e-5, rtol=1e-4)
    n = out["n_targets"]
    torch.testing.assert_close(out["ce_no_latent_sum"] / n, ref["ce_no_latent"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["ce_data_latent_sum"] / n, ref["ce_data_latent"], atol=1e-5, rtol=1e-4)
    # Per-sample evaluation statistics add up to the batch terms.
    per_sample = dict(zip(tlc.EVAL_COLUMNS, out["per_sample"].unbind(1)))
    torch.testing.assert_close(per_sample["ce_sum"].sum(), out["ce_sum"].float(), atol=1e-4, rtol=1e-5)
    assert int(per_sample["n_targets"].sum()) == ref["n_targets"]
    torch.testing.assert_close(per_sample["ce_no_latent_sum"].sum() / n, ref["ce_no_latent"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(per_sample["align"].mean(), ref["align"], atol=1e-5, rtol=1e-4)
    expected = (
        model.settings.ce_weight * ref["ce"]
        + model.settings.kl_weight * ref["kl"]
        + model.settings.align_weight * ref["align"]
    )
    torch.testing.assert_close(out["loss"], expected, atol=1e-5, rtol=1e-4)


def test_window_fallback_uses_all_targets_of_a_sample_with_an_empty_window(tiny_model, batch):
    model = tiny_model.eval()
    model.settings.kl_weighting = "uniform"  # every window token counts, so a missing one shows
    s = int(batch["insert_pos"][0])
    # Remove the supervision right after the block in sample 0: its window becomes empty.
    batch["labels"][0, s : s + model.settings.kl_window] = -100
    with torch.no_grad():
        out = model(**batch)
        ref = reference_terms(model, batch, uniform=True)
    n_targets_0 = int((batch["labels"][0, 1:] != -100).sum())
    assert ref["n_window"] > n_targets_0  # sample 0 contributed all its targets to the KL
    torch.testing.assert_close(out["kl"], ref["kl"], atol=1e-5, rtol=1e-4)


def test_uniform_weighting_and_logit_chunking_give_the_same_terms(tiny_model, batch, monkeypatch):
    model = tiny_model.eval()
    model.settings.kl_weighting = "uniform"
    with torch.no_grad():
        whole = model(**batch)
        ref = reference_terms(model, batch, uniform=True)
        monkeypatch.setattr(tlc, "LOGIT_CHUNK_ELEMENTS", 3 * model.teacher.config.vocab_size)  # 3 rows a chunk
        chunked = model(**batch)
    for name in ("ce", "kl", "align"):
        torch.testing.assert_close(whole[name], ref[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(chunked[name], ref[name], atol=1e-5, rtol=1e-4)


def test_ce_is_normalised_by_num_items_in_batch(tiny_model, batch):
    model = tiny_model.eval()
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=torch.tensor(1000))
    torch.testing.assert_close(out["ce_for_loss"], out["ce_sum"] / 1000)


# ----------------------------------------------------------------------------------------------------
# Head and its checkpoints
# ----------------------------------------------------------------------------------------------------


def test_head_shapes_init_and_student_projection(tiny_model):
    head = tlc.HiddenStateHead(64, num_heads=8, dropout=0.1)
    assert head(torch.randn(2, 7, 64)).shape == (2, 7, 64)
    assert head.adaptive_proj.scale.item() == pytest.approx(0.2)
    assert head.adaptive_proj.output_scale.item() == pytest.approx(0.1)
    assert torch.count_nonzero(head.adaptive_proj.proj[0].bias) == 0
    assert head.adaptive_proj.proj[3].weight.abs().max() < 0.01
    # Student of width 48 feeding a teacher of width 64: projected before the head.
    assert isinstance(tiny_model.student_proj, torch.nn.Linear)
    assert tiny_model.student_proj.in_features == 48 and tiny_model.student_proj.out_features == 64


def _outputs_equal(a, b):
    x = torch.randn(2, 5, 64)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))


def test_head_checkpoint_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = tlc.HiddenStateHead(64, 8, 0.1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "head.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = tlc.HiddenStateHead(64, 8, 0.1)
    tlc.load_head_checkpoint(target, str(path))
    _outputs_equal(source, target)


def test_head_checkpoint_nested_torch_format(tmp_path):
    source = tlc.HiddenStateHead(64, 8, 0.1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    nested = {
        name: getattr(source, name).state_dict()
        for name in ("pre_ln", "post_ln", "hidden_mha", "output_projection", "adaptive_proj")
    }
    torch.save(nested, tmp_path / "head.pt")
    target = tlc.HiddenStateHead(64, 8, 0.1)
    tlc.load_head_checkpoint(target, str(tmp_path / "head.pt"))
    _outputs_equal(source, target)

    # Older files: floats `scale` / `output_scale` instead of `adaptive_proj`.
    older = {k: v for k, v in nested.items() if k != "adaptive_proj"}
    older.update(scale=0.7, output_scale=0.3)
    torch.save(older, tmp_path / "old_head.pt")
    target = tlc.HiddenStateHead(64, 8, 0.1)
    tlc.load_head_checkpoint(target, str(tmp_path / "old_head.pt"))
    assert target.adaptive_proj.scale.item() == pytest.approx(0.7)
    assert target.adaptive_proj.output_scale.item() == pytest.approx(0.3)
    torch.testing.assert_close(target.pre_ln.weight, source.pre_ln.weight)


def test_head_checkpoint_wrong_keys_are_listed(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tlc.HiddenStateHead(64, 8, 0.1).state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    del state["post_ln.bias"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(tlc.LatentCommError) as err:
        tlc.load_head_checkpoint(tlc.HiddenStateHead(64, 8, 0.1), str(tmp_path / "bad.safetensors"))
    assert "post_ln.bias" in str(err.value) and "extra.weight" in str(err.value)


def test_head_checkpoint_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"pre_ln": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(tlc.LatentCommError, match="weights-only"):
        tlc.load_head_checkpoint(tlc.HiddenStateHead(64, 8, 0.1), str(tmp_path / "evil.pt"))


def test_vocabulary_head_only_sees_needed_rows(tiny_model, batch):
    """No [B, T, V] logits: the teacher's head only ever gets 2-D blocks of target rows."""
    model = tiny_model.train()
    shapes = []
    handle = model.teacher.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    out = model(**batch)
    out["loss"].backward()
    handle.remove()
    n_targets = int(out["n_targets"])
    # Entropies of D and B at window rows, CE rows of A, KL rows of A and D (and their recomputation in
    # backward): 2-D blocks of at most the batch's targets, never a full sequence.
    assert shapes and all(len(s) == 2 for s in shapes)
    assert max(s[0] for s in shapes) <= n_targets < batch["input_ids"].numel()


def test_attention_choice_and_override():
    assert tlc.choose_attn_implementation(None) == "sdpa"  # no CUDA here
    assert tlc.choose_attn_implementation("eager") == "eager"


@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_reaches_every_load_only_when_asked(assets, monkeypatch, flag):
    import transformers

    seen = []

    def spy(cls_method):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return cls_method(*args, **kwargs)

        return wrapped

    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", spy(cls.from_pretrained))
    model_args = tlc.ModelArguments(assets["teacher"], assets["student"], trust_remote_code=flag)
    data_args = tlc.DataArguments(data_path=assets["data"], hf_hidden_repo=assets["hidden_states"], eval_ratio=0)
    latent_args = tlc.LatentArguments(K=4, head_num_heads=4)
    training_args = tlc.TrainingArguments("/tmp/x")
    teacher_tok, student_tok, new_ids = tlc.build_tokenizers(model_args, data_args)
    tlc.build_datasets(model_args, data_args, latent_args, training_args, teacher_tok, student_tok)
    tlc.build_models(model_args, latent_args, training_args, teacher_tok, new_ids)
    assert len(seen) >= 5 and all(value is flag for value in seen)


def test_training_runs_d_and_b_stop_after_the_last_window_target(tiny_model, batch, monkeypatch):
    """In training, runs D and B only feed the window rows; the teacher being causal, both stop after the
    last window target, and every loss term is the same as with full-length runs (evaluation's)."""
    model = tiny_model  # dropout is off everywhere, so training and evaluation see identical latents
    lengths = []
    original = tlc.LatentCommModel.teacher_hidden

    def spy(self, input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(tlc.LatentCommModel, "teacher_hidden", spy)
    with torch.no_grad():
        full = model.eval()(**batch)
        assert lengths == [batch["input_ids"].shape[1]] * 3
        lengths.clear()
        cut = model.train()(**batch)
    s, window = batch["insert_pos"], model.settings.kl_window
    positions = torch.arange(batch["labels"].shape[1])
    window_targets = (batch["labels"] != -100) & (positions >= s[:, None]) & (positions < s[:, None] + window)
    last = int(positions.expand_as(window_targets)[window_targets].max())
    assert lengths == [last + 1, last + 1, batch["input_ids"].shape[1]]  # D, B, then A in full
    assert last + 1 < 0.6 * batch["input_ids"].shape[1]  # the test batch really is cut
    for name in ("loss", "ce", "kl", "align"):
        torch.testing.assert_close(cut[name], full[name], atol=1e-5, rtol=1e-4)  # as against the reference

    # A sample whose window is empty falls back to all its targets: nothing can be cut then.
    labels = batch["labels"].clone()
    labels[0, : int(s[0]) + window] = -100
    lengths.clear()
    with torch.no_grad():
        model(**{**batch, "labels": labels})
    last_target = int((labels != -100).nonzero()[:, 1].max())
    assert lengths[:2] == [last_target + 1] * 2
