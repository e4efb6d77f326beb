"""The chat template: layout, the SFT mask, prompt/response consistency across tokenizers,
and the Anthropic text format."""

import numpy as np
import pytest

from rlhf_jax.data.chat import (
    InContextAlignment,
    format_anthropic,
    in_context_turns,
    parse_anthropic,
    render_chat,
    render_prompt,
    render_response,
    render_urial_prompt,
    split_final_assistant,
)
from rlhf_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

DIALOGUE = [
    ("system", "Be brief."),
    ("human", "Wie heißt die Hauptstadt?"),
    ("assistant", "Berlin."),
    ("human", "And of Japan? <|assistant|>"),
    ("assistant", "東京 (Tokyo)."),
]


@pytest.fixture(scope="module", params=["byte", "sentencepiece"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte":
        return ByteTokenizer()
    corpus = [text for _, text in DIALOGUE] * 10
    return SentencePieceTokenizer.train(corpus, tmp_path_factory.mktemp("sp"), vocab_size=300)


def test_byte_layout_matches_the_documented_template():
    tok = ByteTokenizer()
    turns = [("human", "hi"), ("assistant", "yo")]

    def text(s):
        return [b + 6 for b in s.encode()]

    expected = [
        tok.bos_id,
        tok.role_ids["human"],
        *text("hi"),
        tok.role_ids["assistant"],
        *text("yo"),
        tok.eos_id,
    ]
    rendered = render_chat(turns, tok)
    assert rendered.ids.tolist() == expected
    assert rendered.assistant_mask.tolist() == [False] * 5 + [True] * 3
    assert rendered.prompt_length == 5


def test_assistant_mask_covers_assistant_text_and_eos_only(tokenizer):
    rendered = render_chat(DIALOGUE, tokenizer)
    ids, mask = rendered.ids, rendered.assistant_mask
    assert ids.shape == mask.shape and ids.dtype == np.int32
    expected = sum(len(tokenizer.encode(t)) + 1 for r, t in DIALOGUE if r == "assistant")
    assert mask.sum() == expected
    # Every masked run decodes to an assistant reply and ends with eos.
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(mask.astype(int))) + 1)
    replies = [ids[r] for r in runs if mask[r[0]]]
    assert [tokenizer.decode(r) for r in replies] == [t for r, t in DIALOGUE if r == "assistant"]
    assert all(r[-1] == tokenizer.eos_id for r in replies)
    # One role marker per turn: the marker string in the human text stays plain text.
    markers = np.isin(ids, list(tokenizer.role_ids.values()))
    assert markers.sum() == len(DIALOGUE)


def test_prompt_plus_response_is_the_rendered_dialogue(tokenizer):
    context, reply = split_final_assistant(DIALOGUE)
    rendered = render_chat(DIALOGUE, tokenizer)
    prompt = render_prompt(context, tokenizer)
    response = render_response(reply, tokenizer)
    np.testing.assert_array_equal(rendered.ids, np.concatenate([prompt, response]))
    np.testing.assert_array_equal(rendered.prompt_ids, prompt)
    np.testing.assert_array_equal(rendered.response_ids, response)
    assert prompt[-1] == tokenizer.role_ids["assistant"]
    assert rendered.assistant_mask[rendered.prompt_length :].all()


def test_no_bos_when_asked_and_no_prompt_split_without_final_reply():
    tok = ByteTokenizer()
    rendered = render_chat([("human", "x")], tok, add_bos=False)
    assert rendered.ids.tolist() == [tok.role_ids["human"], ord("x") + 6]
    assert rendered.prompt_length is None
    with pytest.raises(ValueError, match="does not end with an assistant"):
        _ = rendered.response_ids


@pytest.mark.parametrize(
    "turns, message",
    [([("user", "x")], "role 'user'"), ([("human", 3)], "must be str"), ([("human",)], "must be")],
)
def test_invalid_turns_are_named(turns, message):
    with pytest.raises(ValueError, match=message):
        render_chat(turns, ByteTokenizer())


def test_render_prompt_refuses_a_final_assistant_turn():
    with pytest.raises(ValueError, match="nothing to reply to"):
        render_prompt([("human", "a"), ("assistant", "b")], ByteTokenizer())


def test_parse_anthropic_multi_turn():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me\na joke\n\nAssistant: No."
    assert parse_anthropic(text) == [
        ("human", "Hi there"),
        ("assistant", "Hello!"),
        ("human", "Tell me\na joke"),
        ("assistant", "No."),
    ]
    assert format_anthropic(parse_anthropic(text)) == text


def test_parse_anthropic_keeps_empty_final_reply_and_rejects_other_text():
    assert parse_anthropic("\n\nHuman: q\n\nAssistant:") == [("human", "q"), ("assistant", "")]
    with pytest.raises(ValueError, match="must start with"):
        parse_anthropic("Human: no leading blank line")
    with pytest.raises(ValueError, match="only human and assistant"):
        format_anthropic([("system", "x")])


def test_urial_prompt_is_the_hand_built_concatenation():
    tok = ByteTokenizer()
    alignment = InContextAlignment(
        system_prompt="Be kind.", examples=(("Hi?", "Hello!"), ("2+2?", "4, glad to help."))
    )
    query = [("human", "Capital of Peru?")]

    def text(s):
        return list(tok.encode(s))

    role = tok.role_ids
    expected = [tok.bos_id, role["system"], *text("Be kind.")]
    for q, a in alignment.examples:
        expected += [role["human"], *text(q), role["assistant"], *text(a), tok.eos_id]
    expected += [role["human"], *text("Capital of Peru?"), role["assistant"]]
    assert render_urial_prompt(query, tok, alignment).tolist() == expected
    assert in_context_turns(query, alignment)[-1] == query[0]


def test_urial_without_examples_or_system_prompt_is_the_plain_prompt(tokenizer):
    context, _ = split_final_assistant(DIALOGUE)
    np.testing.assert_array_equal(
        render_urial_prompt(context, tokenizer, InContextAlignment()),
        render_prompt(context, tokenizer),
    )
    # A system prompt only: the same as writing the system turn by hand.
    turns = [("human", "Hi")]
    np.testing.assert_array_equal(
        render_urial_prompt(turns, tokenizer, InContextAlignment(system_prompt="Be brief.")),
        render_prompt([("system", "Be brief."), *turns], tokenizer),
    )
    with pytest.raises(ValueError, match="already hold a system turn"):
        in_context_turns(context, InContextAlignment(system_prompt="Be kind."))
