"""Generation with the latent: batched, left-padded `generate` equals a greedy loop over training's splice."""

import pytest
import torch

import evaluate_latent as ev
import train_latent_comm as tlc


def conversations_of(assets, n=5):
    records = tlc.load_records(assets["data"])
    for i, record in enumerate(records[:n]):  # first user messages (and so prompts) of different lengths
        first_user = next(t for t in record["conversations"] if t["from"] == "human")
        first_user["value"] += " Be quick and careful." * i
    return tlc.parse_conversations(records[:n], tlc.ProblemLog())


def make_run(model, tokenizer, fmt):
    config = {"conversation_format": fmt, "plan_prompt": tlc.DEFAULT_PLAN_PROMPT, "student_max_length": 1024}
    return tlc.LatentRun(model.settings, tokenizer, tokenizer, config)


@torch.no_grad()
def greedy_reference(model, run, conv, steps, use_latent=True):
    """One conversation, no padding, no cache: the full spliced sequence (training's `teacher_hidden`) is run
    again for every new token."""
    tokenizer = run.teacher_tokenizer
    before, after = ev.teacher_prompt_ids(conv, tokenizer, run.config["conversation_format"])
    student_ids = torch.tensor([ev.student_prompt_ids(conv, tokenizer, run.config)])
    latents = model.project_student_latents(model.student_latents(student_ids, torch.ones_like(student_ids)))
    ids, generated = before + after, []
    lm_head = model.teacher.get_output_embeddings()
    for _ in range(steps):
        input_ids = torch.tensor([ids + generated])
        mask = torch.ones_like(input_ids)
        if use_latent:
            hidden = model.teacher_hidden(input_ids, mask, torch.tensor([len(before)]), latents)
        else:
            hidden = model.teacher_hidden(input_ids, mask)
        token = lm_head(hidden[0, -1]).argmax().item()
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
    return generated


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_generation_with_latent_equals_a_spliced_greedy_loop(tiny_model, tokenizer, assets, fmt):
    model = tiny_model.eval()
    run = make_run(model, tokenizer, fmt)
    conversations = conversations_of(assets)
    lengths = {len(sum(ev.teacher_prompt_ids(c, tokenizer, fmt), [])) for c in conversations}
    assert len(lengths) == len(conversations)  # left padding really happens in the batch
    out = ev.generate_with_latent(model, run, conversations, max_new_tokens=8, batch_size=5)
    assert [o["id"] for o in out] == [c.id for c in conversations]
    for conv, result in zip(conversations, out):
        reference = greedy_reference(model, run, conv, 8)
        assert result["token_ids"] == reference
        assert result["text"] == tokenizer.decode(reference, skip_special_tokens=True)


def test_generation_without_latent_is_the_plain_teacher(tiny_model, tokenizer, assets):
    model = tiny_model.eval()
    run = make_run(model, tokenizer, "plain")
    conversations = conversations_of(assets, 3)
    out = ev.generate_with_latent(model, run, conversations, use_latent=False, max_new_tokens=6, batch_size=3)
    for conv, result in zip(conversations, out):
        assert result["token_ids"] == greedy_reference(model, run, conv, 6, use_latent=False)


def test_the_latent_changes_the_reply(tiny_model, tokenizer, assets):
    """The block is really seen: with a head whose output is large, the reply with latent differs from the
    reply without (a generation path that dropped the latent, or hid it behind the mask, would not), and it
    still equals the spliced greedy loop."""
    model = tiny_model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        model.head.output_projection[-1].bias.normal_(0, 1.0)
    run = make_run(model, tokenizer, "plain")
    conversations = conversations_of(assets, 3)
    with_latent = ev.generate_with_latent(model, run, conversations, max_new_tokens=6)
    without = ev.generate_with_latent(model, run, conversations, use_latent=False, max_new_tokens=6)
    assert [w["token_ids"] for w in with_latent] != [w["token_ids"] for w in without]
    assert with_latent[1]["token_ids"] == greedy_reference(model, run, conversations[1], 6)


def test_prompt_pieces_match_training_encoding(tokenizer, assets):
    """The teacher prompt before the block is exactly training's tokens up to `insert_pos` (both formats)."""
    conversations = conversations_of(assets, 4)
    store = tlc.HiddenStateStore(assets["hidden_states"])
    for fmt in ("plain", "chat"):
        data_args = tlc.DataArguments(conversation_format=fmt, model_max_length=1024)
        for conv in conversations:
            sample = tlc.encode_conversation(conv, store.row_of[conv.id], tokenizer, tokenizer, data_args, 4)
            before, after = ev.teacher_prompt_ids(conv, tokenizer, fmt)
            assert before == sample.input_ids[: sample.insert_pos].tolist()
            # What follows the block in training starts with the generation header (chat) or the reply (plain).
            assert sample.input_ids[sample.insert_pos : sample.insert_pos + len(after)].tolist() == after
            assert ev.student_prompt_ids(conv, tokenizer, {**data_args.__dict__}) == sample.student_input_ids.tolist()
