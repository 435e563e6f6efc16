from raybpo.data.schema import canonical_prompt, make_pair_id, prompt_messages


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
