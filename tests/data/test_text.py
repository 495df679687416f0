"""ChatML encoding: layout, assistant-only loss mask, one media placeholder, truncation policy."""

import numpy as np
import pytest

from vsalmonn_jax.data import text

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(synth_dir):
    return text.load_tokenizer(str(synth_dir / "tokenizer"))


def test_tokenizer_specials_and_size(tok):
    ids = [text.token_id(tok, t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<media>")]
    assert ids == [0, 1, 2, 3]
    assert len(tok) <= 512
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    caption = "At 3 s, the red circle appears. At 5 s, a low beep sounds."
    assert tok.decode(tok.encode(caption, add_special_tokens=False)) == caption
    assert len(tok.encode(caption, add_special_tokens=False)) <= 20     # words are whole tokens
    with pytest.raises(ValueError, match="no token"):
        text.token_id(tok, "<nope>")


def test_conversation_layout_and_loss_mask(tok):
    turns = [{"role": "user", "content": "<media>\nDescribe."},
             {"role": "assistant", "content": "At 1 s, the red circle appears."}]
    ids, mask = text.encode_conversation(tok, turns)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    assert tok.decode(ids) == (SYSTEM + "<|im_start|>user\n<media>\nDescribe.<|im_end|>\n"
                               "<|im_start|>assistant\nAt 1 s, the red circle appears.<|im_end|>")
    assert tok.decode(ids[mask]) == "At 1 s, the red circle appears.<|im_end|>"
    assert ids[mask][-1] == text.token_id(tok, "<|im_end|>")
    assert (ids == 3).sum() == 1


def test_multi_turn_trains_every_assistant_turn(tok):
    turns = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A. one"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B. two"}]
    ids, mask = text.encode_conversation(tok, turns, has_media=False)
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert tok.decode(ids[mask]) == "A. one<|im_end|>B. two<|im_end|>"


def test_prompt_is_prefix_of_training_sequence(tok):
    prompt = text.encode_prompt(tok, "Please describe the video in detail.")
    ids, mask = text.encode_response(tok, "Please describe the video in detail.", "At 2 s, a low beep sounds.")
    np.testing.assert_array_equal(ids[: len(prompt)], prompt)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert not mask[: len(prompt)].any() and mask[len(prompt):].all()


def test_placeholder_rules(tok):
    ids, _ = text.encode_response(tok, "Describe.", "ok")          # inserted before the question
    assert "<|im_start|>user\n<media>\nDescribe." in tok.decode(ids)
    with pytest.raises(ValueError, match="2 media placeholders"):
        text.encode_response(tok, "<media> and <media>", "ok")
    with pytest.raises(ValueError, match="without media"):
        text.encode_response(tok, "<media> hi", "ok", has_media=False)
    ids, _ = text.encode_response(tok, "hi", "ok", has_media=False)
    assert (ids == 3).sum() == 0


def test_truncation_policy(tok):
    response = "At 1 s, the red circle appears. At 2 s, the red circle vanishes."
    full, _ = text.encode_response(tok, "Describe.", response)
    prompt = len(text.encode_prompt(tok, "Describe."))
    cap = prompt + 6
    with pytest.raises(ValueError, match=f"{len(full)} tokens .* > max_length {cap}"):
        text.encode_response(tok, "Describe.", response, max_length=cap)
    ids, mask = text.encode_response(tok, "Describe.", response, max_length=cap,
                                     truncation="truncate_response")
    assert len(ids) == cap and mask[-1] and ids[-1] != text.token_id(tok, "<|im_end|>")
    assert mask[prompt:].all() and not mask[:prompt].any()
    np.testing.assert_array_equal(ids, full[:cap])
    ids, _ = text.encode_response(tok, "Describe.", response, max_length=cap, reserved=4,
                                  truncation="truncate_response")
    assert len(ids) == cap - 4
    with pytest.raises(ValueError, match=f"max_length {prompt - 1}"):   # prompt never cut
        text.encode_response(tok, "Describe.", response, max_length=prompt - 1,
                             truncation="truncate_response")


def test_bad_turns_are_rejected(tok):
    with pytest.raises(ValueError, match="turn 0"):
        text.encode_conversation(tok, [{"role": "robot", "content": "x"}], has_media=False)


def test_mcq_prompt_and_answer():
    assert text.mcq_prompt("Q?", ["x", "y"]) == "Q?\nA. x\nB. y\nAnswer with the option's letter."
    assert text.mcq_answer(["x", "y"], 1) == "B. y"


def test_placeholder_is_added_to_a_tokenizer_without_it(tmp_path):
    from vsalmonn_jax.data.tokenizer_build import build_tokenizer

    build_tokenizer(["At 3 s, a low beep sounds."], str(tmp_path / "tok"), placeholder="<image>")
    with pytest.raises(ValueError, match="no token '<media>'"):
        text.token_id(text.load_tokenizer(str(tmp_path / "tok")), "<media>")
    tok = text.load_tokenizer(str(tmp_path / "tok"), "<media>")
    media = text.token_id(tok, "<media>")
    assert media == len(tok) - 1
    ids, _ = text.encode_response(tok, "<media>\nhi", "ok")
    assert list(ids).count(media) == 1


def test_official_prompt_format_puts_two_newline_tokens_after_the_media(tok):
    """The release: `user\\n` + media + `\\n` + tokens("\\n" + prompt); clean: one newline."""
    prompt = "Please describe the video in detail."
    nl = tok.encode("\n", add_special_tokens=False)
    assert len(nl) == 1
    head = [1] + tok.encode("user\n", add_special_tokens=False)
    official = list(text.encode_prompt(tok, prompt, prompt_format="official"))
    user = official[official.index(3) - len(head):]
    expected = head + [3] + nl + tok.encode("\n" + prompt, add_special_tokens=False) + [2] + nl
    assert user[:len(expected)] == expected
    assert user[len(head):len(head) + 3] == [3, nl[0], nl[0]]           # media, "\n", "\n"
    clean = list(text.encode_prompt(tok, prompt))
    assert clean[clean.index(3) + 1] == nl[0] and clean[clean.index(3) + 2] != nl[0]
    assert len(official) == len(clean) + 1
    # a placeholder given in the text is moved to the front (the release's preprocess_multimodal)
    moved = text.encode_prompt(tok, f"{prompt} <media>", prompt_format="official")
    np.testing.assert_array_equal(moved, official)
    # the release's records write LLaVA's `<image>`: it is the media place (was kept as text, with
    # a second placeholder put in front)
    release = text.encode_prompt(tok, f"<image>\n{prompt}", prompt_format="official")
    np.testing.assert_array_equal(release, official)
    ids, mask = text.encode_response(tok, prompt, "ok", prompt_format="official")
    np.testing.assert_array_equal(ids[:len(official)], official)
    assert tok.decode(ids[mask]) == "ok<|im_end|>"
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        text.encode_prompt(tok, prompt, prompt_format="literal")


def test_a_release_test_record_is_prompted_with_its_question_history_and_prefix(tok):
    """The caption path read only "prompt": a record in the release's conversation form (its test
    sets) was captioned with the default prompt, its question and answer prefix lost."""
    from vsalmonn_jax.data.example import caption_prompt_ids

    default = "Please describe the video in detail."
    record = {"conversations": [
        {"from": "human", "value": "<image>\nWhat does the red circle do?"},
        {"from": "gpt", "value": "It appears.", "prefix": "At 1 s, the"}]}
    ids = list(caption_prompt_ids(record, tok, default, prompt_format="official"))
    question = list(text.encode_prompt(tok, "<image>\nWhat does the red circle do?",
                                       prompt_format="official"))
    assert ids[:len(question)] == question                            # the question, not the default
    assert ids[len(question):] == tok.encode("At 1 s, the", add_special_tokens=False)
    no_prefix = {"conversations": [dict(record["conversations"][0]),
                                   {"from": "gpt", "value": "It appears."}]}
    assert list(caption_prompt_ids(no_prefix, tok, default, prompt_format="official")) == question
    # history is kept: earlier turns come before the last question
    history = {"conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                 {"from": "gpt", "value": "At 1 s, the red circle appears."},
                                 {"from": "human", "value": "And then?"},
                                 {"from": "gpt", "value": ""}]}
    ids = caption_prompt_ids(history, tok, default)
    assert tok.decode(ids).count("<|im_start|>") == 5                  # system, 3 turns, assistant
    assert "At 1 s, the red circle appears.<|im_end|>" in tok.decode(ids)
    # a "prompt" field still wins; a record without either gets the default
    assert list(caption_prompt_ids({**record, "prompt": default}, tok, "x")) == \
        list(text.encode_prompt(tok, default))
    assert list(caption_prompt_ids({}, tok, default)) == list(text.encode_prompt(tok, default))
    with pytest.raises(ValueError, match="no user turn"):
        caption_prompt_ids({"conversations": [{"from": "gpt", "value": "x"}]}, tok, default)
