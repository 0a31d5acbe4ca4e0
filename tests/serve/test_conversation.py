"""A follow-up question reuses the kept context (images and earlier turns are not computed again) and
gets exactly the answer and attention of reading the whole conversation from scratch."""

import pytest
import torch

from monailabel_app.io.xray import pad_to_square
from monailabel_app.language.asking import ask_in
from monailabel_app.model.decoding import prefill_and_decode
from monailabel_app.model.generation import chat_ids, chat_messages, follow_up, generate_batch
from monailabel_app.phantoms.films import make_phantom
from monailabel_app.phantoms.model import DEFAULT_QUESTION, DEFAULT_QUESTION_ZH, DESCRIBE_ZH


def _from_scratch(reader, image, messages, rollout):
    """The whole conversation, images included, prefilled at once (no kept context)."""
    full = [dict(m) for m in messages]
    full[0] = {"role": "user", "content": [{"type": "image", "image": image}] + messages[0]["content"][1:]}
    inputs = reader.processor.apply_chat_template(full, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
    inputs = {k: v.to(reader.model.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(reader.model.dtype)
    return prefill_and_decode(reader.model, inputs, reader.layers, 256, 40, rollout,
                              eos=sorted(reader.model.generation_config.eos_token_id))


CHATS = {  # first question, follow-ups
    "en": (DEFAULT_QUESTION, ("Is it on the right?", "Describe the findings in this chest X-ray.")),
    "zh": (ask_in(DEFAULT_QUESTION_ZH, "zh"), ("它在哪里？", DESCRIBE_ZH)),
}


@pytest.mark.parametrize("language", ["en", "zh"])
def test_follow_up_equals_the_conversation_read_from_scratch(reader_in, language):
    reader = reader_in
    model, proc = reader.model, reader.processor
    image = pad_to_square(make_phantom(11).image)[0]
    rollout = bool(reader.info.grounding.get("rollout"))
    first_question, follow_ups = CHATS[language]
    first = generate_batch(model, proc, [([image], first_question)], reader.layers, 40, rollout=rollout,
                           keep=True)[0]
    assert (language == "zh") == any("\u4e00" <= c <= "\u9fff" for c in first.text)  # answered in the language asked
    conv = first.conversation
    assert conv.turns == 1 and len(conv.context.ids) == first.prompt_tokens + len(first.token_ids) - 1
    # the kept ids are what the chat template renders (no image processed)
    assert chat_ids(proc, chat_messages([None], first_question))[: first.prompt_tokens] == conv.context.ids[: first.prompt_tokens]

    for question in follow_ups:
        gen = follow_up(model, proc, conv, question, reader.layers, 40, rollout)
        assert gen.timings["reused_tokens"] > first.prompt_tokens  # images and the first turn were not fed again
        ref = _from_scratch(reader, image, gen.conversation.messages[:-1], rollout)
        assert gen.token_ids == ref.rows[0].token_ids
        diff = (gen.attention.float().cpu() - ref.attention[: len(gen.token_ids), :, 0].float().cpu()).abs().max().item()
        print(f"follow-up vs from scratch on {model.device} ({model.dtype}): max attention difference {diff:.2e}")
        assert diff < (1e-4 if model.dtype == torch.float32 else 2e-2)  # 16-bit: kernels differ by a rounding
        conv = gen.conversation
    assert conv.turns == 3 and [m["role"] for m in conv.messages] == ["user", "assistant"] * 3


def test_store_limits_count_bytes_and_idle_time():
    from monailabel_app.errors import InputError
    from monailabel_app.model.decoding import Context
    from monailabel_app.model.generation import Conversation
    from monailabel_app.serve.conversation import Conversations, Entry

    def entry(n_bytes):
        k = torch.zeros(n_bytes // 8, dtype=torch.float32)  # keys + values: n_bytes in all
        return Entry("img", None, Conversation([], Context([1], [k], [k], torch.tensor([[0]]))))

    store = Conversations(max_count=2, max_bytes=1000, ttl_s=60)
    a, b = store.add(entry(400)), store.add(entry(400))
    store.get(a)  # a is now the most recently used
    c = store.add(entry(400))  # over 1000 bytes: b (least recently used) goes
    with pytest.raises(InputError) as e:
        store.get(b)
    assert e.value.status == 404
    assert store.get(a) and store.get(c) and len(store) == 2
    with pytest.raises(InputError) as e:
        store.add(entry(2000))
    assert e.value.status == 413
    with pytest.raises(InputError) as e:
        store.get(a, image="other")
    assert e.value.status == 422
    store.ttl_s = 0.0
    with pytest.raises(InputError):
        store.get(c)


def test_follow_up_reuses_every_kept_token_when_the_answer_retokenises_differently(reader):
    from monailabel_app.model.generation import _turn_ids

    model, proc = reader.model, reader.processor
    image = pad_to_square(make_phantom(23).image)[0]
    first = generate_batch(model, proc, [([image], DEFAULT_QUESTION)], reader.layers, 40, keep=True)[0]
    conv = first.conversation
    conv.messages[-1]["content"][0]["text"] = "  " + first.text  # renders to other tokens than were generated
    messages = conv.messages + [{"role": "user", "content": [{"type": "text", "text": "Where is it?"}]}]
    ids = _turn_ids(proc, conv, messages)
    assert ids[: len(conv.context.ids)] == conv.context.ids and ids[len(conv.context.ids)] == first.token_ids[-1]
    gen = follow_up(model, proc, conv, "Where is it?", reader.layers, 40)
    assert gen.timings["reused_tokens"] == len(conv.context.ids) and gen.text


def test_a_follow_up_depends_on_what_was_said_before(reader):
    """The same follow-up about the same image, after two different first answers (teacher-forced), is
    answered from different contexts: the earlier turn is really in the model's context."""
    model, proc = reader.model, reader.processor
    image = pad_to_square(make_phantom(7).image)[0]
    follow = []
    for said in ("nodule in the right upper zone.", "effusion in the left lower zone."):
        first = generate_batch(model, proc, [([image], DEFAULT_QUESTION)], reader.layers, 40, answers=[said],
                               keep=True)[0]
        assert first.text == said
        follow.append(follow_up(model, proc, first.conversation, "Where is it?", reader.layers, 40))
    assert not torch.allclose(follow[0].attention[0], follow[1].attention[0])


def test_a_follow_up_about_it_names_the_first_finding(reader_in):
    """Grounded in the earlier turn: after the report, "Where is it?" names where the report's first
    finding is (the phantom's follow-up answer: "it is in the <side> <level> zone.")."""
    from monailabel_app.io.xray import Geometry, Radiograph

    reader = reader_in
    seeds = [s for s in range(60) if make_phantom(s).lesions][:30]
    ok = 0
    for s in seeds:
        image = make_phantom(s).image
        first = reader.read(Radiograph(image, Geometry.plain(*image.shape)), keep=True)
        again = reader.follow_up(first.study, first.generation.conversation, "Where is it?")
        named = again.findings[0] if again.findings else None
        ok += (again.report.startswith("it is in the") and named is not None and first.findings
               and (named.side, named.level) == (first.findings[0].side, first.findings[0].level))
    assert ok / len(seeds) >= 0.9
