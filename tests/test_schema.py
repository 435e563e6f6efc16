from raybpo.data.schema import (
    canonical_prompt,
    chat_transcript,
    make_pair_id,
    plain_prompt,
    plain_response,
    prompt_messages,
    stored_response,
)
from raybpo.models.reward import reward_text


def test_pair_id_is_stable_and_content_addressed():
    pair_id = make_pair_id("hh", "Hi", "Hello!", "Go away.")
    assert pair_id == make_pair_id("hh", "Hi", "Hello!", "Go away.")
    assert pair_id == "a26130454292c2e487c1fe4c6679dd5a"  # fixed forever: ids must not drift between releases
    assert (
        len(
            {pair_id, make_pair_id("other", "Hi", "Hello!", "Go away."), make_pair_id("hh", "Hi", "Go away.", "Hello!")}
        )
        == 3
    )


def test_pair_id_fields_cannot_run_together():
    assert make_pair_id("s", "ab", "c", "d") != make_pair_id("s", "a", "bc", "d")


def test_chat_prompts_round_trip():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "?"},
    ]
    stored = canonical_prompt(messages)
    assert prompt_messages(stored) == messages
    assert prompt_messages("[not json") is None and prompt_messages("plain text") is None


def test_chat_prompts_render_as_one_hh_transcript():
    chat = canonical_prompt(
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey"},
        ]
    )
    assert chat_transcript(prompt_messages(chat)) == "\n\nSystem: Be kind.\n\nHuman: Hi\n\nAssistant: Hey\n\nAssistant:"
    assert plain_prompt(chat) == chat_transcript(prompt_messages(chat))
    assert plain_response(chat, "Hello!") == " Hello!" and stored_response(chat, " Hello!") == "Hello!"
    assert stored_response(chat, "\nHello!") == "\nHello!"
    assert (plain_prompt("Hi"), plain_response("Hi", " x"), stored_response("Hi", " x")) == ("Hi", " x", " x")


def test_reward_models_read_chat_prompts_as_the_transcript():
    chat = canonical_prompt([{"role": "user", "content": "Hi"}])
    assert reward_text(chat, "Hello!") == "\n\nHuman: Hi\n\nAssistant: Hello!"
    assert reward_text("Hi", "Hello!") == "Hi\nHello!"
