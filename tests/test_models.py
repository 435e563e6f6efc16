"""Tiny model and tokenizer, tokenisation edge cases, batched log-probs, length bucketing."""

import json

import pytest
import torch

from raybpo.config import TinyModelConfig
from raybpo.data.benchmark import TOPICS
from raybpo.data.readers import ParsedPair, read_hh, split_hh
from raybpo.data.schema import canonical_prompt, plain_response, prompt_messages
from raybpo.models.generation import sample_seed, sample_seeded, sample_token_ids
from raybpo.models.loading import ModelNotFoundError, gguf_path, load_causal_lm, resolve_model_path
from raybpo.models.logps import collate, collate_pairs, length_bucketed_batches, pair_logps, sequence_logps
from raybpo.models.tiny import build_tiny_model
from raybpo.models.tokenize import TokenizationError, encode_example, encode_pair, encode_prompt, render_prompt

TEXTS = [f"Describe the {t}. The {t} is {' '.join(facts)}." for t, facts in TOPICS.items()] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY = TinyModelConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(TEXTS, TINY, tmp_path_factory.mktemp("tiny"), seed=0)
    return load_causal_lm(str(path))


def test_tiny_model_is_saved_as_safetensors_and_reloads_identically(tiny, tmp_path):
    model, tokenizer = tiny
    path = build_tiny_model(TEXTS, TINY, tmp_path, seed=0)
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    again, _ = load_causal_lm(str(path))
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    text = "Describe the volcano. The volcano is lava, magma!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer("The volcano is lava")["input_ids"]) <= 5  # BPE learned the benchmark's words


def test_long_prompt_keeps_its_end_and_responses_end_with_eos(tiny):
    _, tokenizer = tiny
    prompt = " ".join(f"word{i}" for i in range(200)) + " Describe the cat."
    pair = encode_pair(tokenizer, prompt, "The cat is furry.", "No.", max_length=64, max_prompt_length=16)
    assert len(pair.prompt) == 16
    assert tokenizer.decode(pair.prompt).endswith("Describe the cat.")
    assert pair.chosen[-1] == pair.rejected[-1] == tokenizer.eos_token_id
    assert len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) <= 64


def test_long_response_is_cut_to_fit(tiny):
    _, tokenizer = tiny
    pair = encode_pair(tokenizer, "Describe the cat.", "furry " * 100, "No.", max_length=32, max_prompt_length=16)
    assert len(pair.prompt) + len(pair.chosen) == 32 and pair.rejected[-1] == tokenizer.eos_token_id


def test_empty_response_is_just_eos(tiny):
    _, tokenizer = tiny
    prompt_ids, response_ids = encode_example(tokenizer, "Describe the cat.", "", max_length=64, max_prompt_length=32)
    assert response_ids == [tokenizer.eos_token_id] and prompt_ids[0] == tokenizer.bos_token_id


def test_nothing_of_the_response_fits_is_an_error(tiny):
    _, tokenizer = tiny
    with pytest.raises(TokenizationError, match="nothing of the response fits"):
        encode_pair(tokenizer, "Describe the cat. " * 20, "furry", "no", max_length=16, max_prompt_length=16)


def test_chat_template_is_applied_to_text_and_chat_prompts(tiny):
    _, tokenizer = tiny
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "?"},
    ]
    assert render_prompt(tokenizer, "Describe the cat.") == "Describe the cat."  # the tiny model has no template
    assert (
        render_prompt(tokenizer, canonical_prompt(messages))
        == "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: ?\n\nAssistant:"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        assert render_prompt(tokenizer, "Describe the cat.") == "<|user|>Describe the cat.<|assistant|>"
        assert render_prompt(tokenizer, canonical_prompt(messages)).endswith("<|user|>?<|assistant|>")
        assert render_prompt(tokenizer, "Describe the cat.", use_chat_template=False) == "Describe the cat."
    finally:
        tokenizer.chat_template = None


def _hh_forms(hh_lines: list[str], n: int) -> list[tuple[tuple[str, str, str], ParsedPair]]:
    """(text form, chat form) of the first `n` real HH rows that take the chat form."""
    rows = [json.loads(line) for line in hh_lines]
    forms = [(split_hh(r["chosen"], r["rejected"]), read_hh(r)) for r in rows]
    return [(text, chat) for text, chat in forms if prompt_messages(chat["prompt"]) is not None][:n]


def test_base_model_sees_the_same_tokens_for_both_hh_forms(tiny, hh_lines):
    _, tokenizer = tiny
    limits = {"max_length": 256, "max_prompt_length": 128}  # long rows are cut, the same way in both forms
    for (prompt, chosen, rejected), chat in _hh_forms(hh_lines, 100):
        assert chat["chosen"] == chosen[1:]
        as_text = encode_pair(tokenizer, prompt, chosen, rejected, **limits)
        as_chat = encode_pair(tokenizer, chat["prompt"], chat["chosen"], chat["rejected"], **limits)
        assert as_chat == as_text
        example = encode_example(tokenizer, chat["prompt"], chat["chosen"], **limits)
        assert example == encode_example(tokenizer, prompt, chosen, **limits)
        plain = encode_pair(
            tokenizer, chat["prompt"], chat["chosen"], chat["rejected"], use_chat_template=False, **limits
        )
        assert plain == as_text


def test_instruct_tokenizer_sees_hh_rows_as_chat_turns(tiny, hh_lines):
    _, tokenizer = tiny
    ((prompt, chosen, _), chat), *_ = _hh_forms(hh_lines, 1)
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        rendered = render_prompt(tokenizer, chat["prompt"])
        turns = [f"<|{m['role']}|>{m['content']}" for m in prompt_messages(chat["prompt"])]
        assert rendered == "".join(turns) + "<|assistant|>"
        assert rendered.startswith("<|user|>what are some pranks with a pen i can do?<|assistant|>")
        assert "Human:" not in rendered
        _, response_ids = encode_example(tokenizer, chat["prompt"], chat["chosen"], 4096, 2048)
        assert tokenizer.decode(response_ids, skip_special_tokens=True) == chosen[1:]  # no leading space
        # use_chat_template=False: the base-model rendering even though the tokenizer has a template
        assert render_prompt(tokenizer, chat["prompt"], use_chat_template=False) == prompt
    finally:
        tokenizer.chat_template = None


def test_samples_after_a_plain_chat_prompt_drop_the_leading_space(tiny):
    model, tokenizer = tiny
    chat = canonical_prompt([{"role": "user", "content": "Describe the cat."}])
    text = "\n\nHuman: Describe the cat.\n\nAssistant:"
    (as_text,) = sample_seeded(model, tokenizer, [text], [0], max_new_tokens=6)
    (as_chat,) = sample_seeded(model, tokenizer, [chat], [0], max_new_tokens=6)
    assert as_text.startswith(" ") and as_chat == as_text[1:]  # seed 0 starts with a space
    assert plain_response(chat, as_chat) == as_text


def test_concatenated_forward_equals_one_sequence_at_a_time(tiny):
    model, tokenizer = tiny
    pairs = [
        encode_pair(tokenizer, p, c, r, max_length=64, max_prompt_length=32)
        for p, c, r in [
            ("Describe the cat.", "The cat is small and furry.", "It is."),
            ("Tell me about the moon, please, in detail.", "The moon has craters.", "The moon is salty waves deep."),
            ("Hi!", "Sure!", "I hate this."),
        ]
    ]
    batch = collate_pairs(
        [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], tokenizer.pad_token_id
    )
    with torch.no_grad():
        chosen, rejected = pair_logps(model, batch)
        for i, pair in enumerate(pairs):
            for response, batched in ((pair.chosen, chosen[i]), (pair.rejected, rejected[i])):
                alone = sequence_logps(model, collate([(pair.prompt, response)], tokenizer.pad_token_id))
                assert batched.item() == pytest.approx(alone.item(), abs=1e-4)
                ids = torch.tensor([pair.prompt + response])
                logits = model(ids).logits[0, :-1].log_softmax(-1)
                by_hand = sum(logits[t - 1, ids[0, t]].item() for t in range(len(pair.prompt), ids.shape[1]))
                assert batched.item() == pytest.approx(by_hand, abs=1e-4)


def test_length_buckets_are_deterministic_full_and_cover_each_row_once():
    lengths = [((i * 37) % 101) + 1 for i in range(203)]
    batches = length_bucketed_batches(lengths, batch_size=8, seed=3, epoch=1)
    assert batches == length_bucketed_batches(lengths, batch_size=8, seed=3, epoch=1)
    assert batches != length_bucketed_batches(lengths, batch_size=8, seed=3, epoch=2)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 200 and all(len(b) == 8 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15  # bucketing: similar lengths share a batch (random batches spread about 75)


def test_model_names_resolve_or_fail_clearly(tmp_path):
    assert gguf_path("smollm2-135m-instruct", None).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path(str(tmp_path), None) is None and resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="is not in"):
        resolve_model_path(str(tmp_path), "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="needs a network"):
        load_causal_lm("no-such-org/no-such-model")


def test_seeded_sampling_is_independent_of_the_batch_and_respects_max_tokens(tiny):
    model, tokenizer = tiny
    prompts = ["Describe the cat.", "Tell me about the moon, please, in detail.", "Hi!", "Describe the owl."]
    batch = sample_seeded(model, tokenizer, prompts, [11, 12, 13, 14], max_new_tokens=12)
    assert sample_seeded(model, tokenizer, prompts[2:], [13, 14], max_new_tokens=12) == batch[2:]
    assert sample_seeded(model, tokenizer, prompts, [11, 12, 13, 14], max_new_tokens=12) == batch
    assert sample_seeded(model, tokenizer, prompts, [21, 22, 23, 24], max_new_tokens=12) != batch
    ids = sample_token_ids(model, tokenizer, prompts, [11, 12, 13, 14], max_new_tokens=12)
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == batch
    assert all(len(row) <= 12 for row in ids) and max(map(len, ids)) == 12  # an untrained model rarely stops


def test_max_prompt_length_keeps_the_end_of_the_prompt(tiny):
    """Two prompts that differ only in their first words sample the same once those words are cut away."""
    model, tokenizer = tiny
    tail = " Describe the moon and the owl, please."
    prompts = ["Tell me about the cat." + tail, "Hi!" + tail]
    keep = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    cut = sample_token_ids(model, tokenizer, prompts, [5, 5], max_new_tokens=8, max_prompt_length=keep)
    assert cut[0] == cut[1]
    ids = torch.tensor([encode_prompt(tokenizer, prompts[0])[-keep:]])
    greedy = sample_token_ids(
        model, tokenizer, prompts[:1], [0], max_new_tokens=8, temperature=0, max_prompt_length=keep
    )
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert greedy[0] == [t for t in theirs[0, keep:].tolist() if t != tokenizer.eos_token_id]


def test_greedy_decoding_equals_hugging_face_generate(tiny):
    model, tokenizer = tiny
    prompts = ["Describe the cat.", "Tell me about the moon, please, in detail."]
    ours = sample_seeded(model, tokenizer, prompts, [0, 0], max_new_tokens=10, temperature=0)
    for prompt, text in zip(prompts, ours, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        theirs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        assert text == tokenizer.decode(theirs[0, ids.shape[1] :], skip_special_tokens=True)


def test_sample_seeds_are_stable():
    assert sample_seed(0, "Describe the cat.", 3) == sample_seed(0, "Describe the cat.", 3)
    assert len({sample_seed(0, "p", i) for i in range(100)} | {sample_seed(1, "p", 0)}) == 101
