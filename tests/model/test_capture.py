"""The captured rows are exactly the attention weights an eager forward computes, and capture changes nothing."""

import numpy as np
import torch
from PIL import Image

from monailabel_app.io.xray import pad_to_square
from monailabel_app.model.generation import build_inputs, generate, loop_start
from monailabel_app.phantoms.films import make_phantom
from monailabel_app.phantoms.model import DEFAULT_QUESTION, PHANTOM_MODEL_DIR


def test_captured_rows_equal_eager_attention(reader):
    from transformers import Gemma3ForConditionalGeneration

    model, proc = reader.model, reader.processor
    image = pad_to_square(make_phantom(11).image)[0]  # two lesions
    layers = [0, 1, 2, 3]
    gen = generate(model, proc, [image], DEFAULT_QUESTION, layers, max_new_tokens=40)
    assert gen.layers == layers and gen.attention.shape[:3] == (len(gen.token_ids), 4, 4)
    assert gen.attention.shape[3] == 256

    # eager attention on the reader's own device (a GPU's float32 differs from the CPU's beyond 1e-5)
    eager = Gemma3ForConditionalGeneration.from_pretrained(PHANTOM_MODEL_DIR, attn_implementation="eager").eval()
    eager.to(model.device)
    inputs = build_inputs(proc, [image], DEFAULT_QUESTION, None, model.device, torch.float32)
    prompt_len = inputs["input_ids"].shape[1]
    new = torch.tensor([gen.token_ids], device=model.device)
    ids = torch.cat([inputs["input_ids"], new], dim=1)
    tt = torch.cat([inputs["token_type_ids"], torch.zeros_like(new)], dim=1)
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=tt,
                    pixel_values=inputs["pixel_values"], output_attentions=True, use_cache=False)
    img_pos = (inputs["input_ids"][0] == model.config.image_token_index).nonzero()[:, 0].cpu()
    rows = torch.arange(len(gen.token_ids)) + prompt_len - 1  # the query that emitted each new token
    for li, layer in enumerate(layers):
        ref = out.attentions[layer][0].cpu()[:, rows][:, :, img_pos].permute(1, 0, 2)  # (tokens, heads, 256)
        assert torch.allclose(gen.attention[:, li], ref, atol=1e-5), layer
    # the answer is the same as plain SDPA generation gives
    sdpa = Gemma3ForConditionalGeneration.from_pretrained(PHANTOM_MODEL_DIR, attn_implementation="sdpa").eval()
    sdpa.to(model.device)
    with torch.no_grad():
        plain = sdpa.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert proc.tokenizer.decode(plain[0, prompt_len:], skip_special_tokens=True).strip() == gen.text.strip()


def test_token_spans_cover_the_finding_text(reader):
    image = pad_to_square(make_phantom(11).image)[0]
    gen = generate(reader.model, reader.processor, [image], DEFAULT_QUESTION, [1], max_new_tokens=40)
    second = gen.text.index(". ") + 2
    toks = gen.token_range((second, len(gen.text)))
    said = "".join(reader.processor.tokenizer.decode([gen.token_ids[i]]) for i in toks)
    assert said.strip() == gen.text[second:].strip()


def test_loop_detection():
    assert loop_start([1, 2, 3, 4, 4, 4]) == 4
    assert loop_start([9, 1, 2, 1, 2, 1, 2]) == 3
    assert loop_start([1, 2, 3, 1, 2, 4]) is None
    a = [5, 6, 7, 8] * 3
    assert a[: loop_start(a)] == [5, 6, 7, 8]
    assert np.all([loop_start(list(range(n))) is None for n in range(12)])


def test_recorder_drops_layers_whose_keys_do_not_cover_the_images():
    from monailabel_app.model.capture import AttentionRecorder

    rec = AttentionRecorder([0, 1], torch.arange(2, 6))
    q = torch.randn(1, 4, 10, 8)
    rec.observe(0, q, torch.randn(1, 2, 10, 8), None, 0.35)  # prefill: keys = prompt
    rec.observe(1, q, torch.randn(1, 2, 4, 8), None, 0.35)  # a sliding window cut the keys
    assert rec.usable_layers == [0] and 1 in rec.dropped
    rows = rec.stacked()
    assert rows.shape == (1, 1, 1, 4, 4)
    assert torch.all(rows.sum(-1) <= 1.0 + 1e-6)  # a share of each row's attention, image columns only
    masked = AttentionRecorder([0], torch.arange(0, 3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., -1, 1] = False  # a key the query may not see gets no weight
    masked.observe(0, torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), mask, 0.35)
    assert torch.all(masked.stacked()[0, 0, 0, :, 1] == 0)


def test_rollout_inside_each_image_equals_the_product_of_eager_mixing(reader):
    """Rolled-out rows = direct rows mapped through prod_l (0.5 I + 0.5 A_l) of the layers below, A_l the
    head-averaged attention among each image's own tokens (renormalised), here from an eager forward."""
    from transformers import Gemma3ForConditionalGeneration

    from monailabel_app.io.ct import interleave, model_slices
    from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
    from monailabel_app.phantoms.model import CT_QUESTION

    model, proc = reader.model, reader.processor
    ms = model_slices(phantom_volume(make_ct_phantom(3)), 3)
    content = interleave([Image.fromarray(im) for im in ms.images])
    layers = [1, 3]
    direct = generate(model, proc, content, CT_QUESTION, layers, max_new_tokens=12)
    rolled = generate(model, proc, content, CT_QUESTION, layers, max_new_tokens=12, rollout=True)
    assert rolled.text == direct.text and rolled.rollout and not direct.rollout
    assert not torch.allclose(rolled.attention, direct.attention)

    eager = Gemma3ForConditionalGeneration.from_pretrained(PHANTOM_MODEL_DIR, attn_implementation="eager").eval()
    eager.to(model.device)  # on the reader's device: a GPU's float32 differs from the CPU's beyond 1e-5
    inputs = build_inputs(proc, content, CT_QUESTION, None, model.device, torch.float32)
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, use_cache=False)
    attentions = [a.cpu() for a in out.attentions]
    n = direct.image_tokens_per_image
    blocks = (inputs["input_ids"][0] == model.config.image_token_index).nonzero()[:, 0].cpu().view(-1, n)
    product = torch.eye(n).expand(len(blocks), n, n).clone()
    below = {}
    for layer in range(max(layers)):
        below[layer] = product.clone()
        a = attentions[layer][0].mean(0)
        for b, pos in enumerate(blocks):
            within = a[pos][:, pos]
            product[b] = (0.5 * torch.eye(n) + 0.5 * within / within.sum(-1, keepdim=True)) @ product[b]
    below[max(layers)] = product
    for li, layer in enumerate(layers):
        rows = direct.attention[:, li].reshape(direct.attention.shape[0], -1, len(blocks), n)  # (tokens, heads, ...)
        expected = torch.einsum("thsi,sij->thsj", rows, below[layer]).reshape(direct.attention[:, li].shape)
        assert torch.allclose(rolled.attention[:, li], expected, atol=1e-5), layer
        # rollout moves attention inside an image, never between images or out of them
        assert torch.allclose(rows.sum(-1), rolled.attention[:, li].reshape(rows.shape).sum(-1), atol=1e-5)


def test_forced_answer_records_the_same_attention_as_the_models_own(reader):
    """Teacher forcing (the control's path): saying its own answer reproduces the tokens and attention
    exactly; saying it about another image keeps the words and gives that image's attention."""
    from monailabel_app.phantoms.films import make_phantom as mp

    model, proc = reader.model, reader.processor
    image = pad_to_square(mp(11).image)[0]
    own = generate(model, proc, [image], DEFAULT_QUESTION, [1, 2], max_new_tokens=40)
    forced = generate(model, proc, [image], DEFAULT_QUESTION, [1, 2], answer=own.text)
    assert forced.token_ids == own.token_ids and forced.text == own.text
    assert torch.allclose(forced.attention, own.attention, atol=1e-6)
    assert np.allclose(forced.token_probs, own.token_probs, atol=1e-5)
    twin = pad_to_square(mp(11, lesions=False).image)[0]
    said = generate(model, proc, [twin], DEFAULT_QUESTION, [1, 2], answer=own.text)
    assert said.text == own.text and not torch.allclose(said.attention, own.attention, atol=1e-3)
    assert min(said.token_probs) < 0.5  # the model would not have said it about a lesion-free image


def test_mixing_within_images_equals_the_softmax_over_every_key(monkeypatch):
    """Each image's own columns of the softmax over every key a token sees, head-averaged and renormalised:
    computed from the scores alone (denominators in place) in small chunks, against softmax-then-gather."""
    from monailabel_app.model import capture
    from monailabel_app.model.capture import AttentionRecorder, scores_f32

    torch.manual_seed(0)
    heads, kv, d, n, images, text = 4, 2, 8, 9, 5, 7
    length = text + images * n + 3
    q, k = torch.randn(1, heads, length, d), torch.randn(1, kv, length, d)
    blocks = (text + torch.arange(images * n)).view(images, n)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    for b in blocks:  # each image sees itself both ways
        mask[b[:, None], b[None, :]] = True
    mask[:, 3] = False  # a key nobody sees
    monkeypatch.setattr(capture, "CHUNK_BYTES", 4 * heads * n * length * 2)  # two images per chunk
    got = AttentionRecorder._within(q, k, mask[None], blocks, 0.3)
    s = scores_f32(q, k, 0.3)[0].masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    ref = torch.stack([p[:, b][:, :, b].mean(0) for b in blocks])
    ref = ref / ref.sum(-1, keepdim=True)
    assert torch.allclose(got, ref, atol=1e-6)


def test_mixing_from_the_kernels_log_sum_exp_equals_the_chunked_pass():
    """The attention kernel's per-row log-sum-exp gives the same within-image mixing as the chunked pass over
    every key, and the same layer output as SDPA (grouped heads, a bidirectional image block, a hidden key).
    On the CPU this is the flash kernel; the lent GPU runs it with cuDNN / memory-efficient attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from monailabel_app.model.capture import AttentionRecorder, attention_and_lse

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(1)
    heads, kv, d, n, images, text = 8, 4, 64, 16, 5, 11
    length = text + images * n + 6
    q, k, v = (torch.randn(1, h, length, d, device=device, dtype=dtype) for h in (heads, kv, kv))
    blocks = (text + torch.arange(images * n, device=device)).view(images, n)
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    for b in blocks:
        mask[b[:, None], b[None, :]] = True
    mask[:, 3] = False
    mask = mask[None, None]

    class Module(torch.nn.Module):
        num_key_value_groups = heads // kv
        is_causal = True

    out, lse = attention_and_lse(q, k, v, mask, 0.125)
    ref = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.125)[0]
    assert out.shape == ref.shape and lse.shape == (1, heads, length)
    assert torch.allclose(out.float(), ref.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    got = AttentionRecorder._within_lse(q, k, lse[0], mask[0], blocks, 0.125)
    chunked = AttentionRecorder._within(q, k, mask[0], blocks, 0.125)
    assert torch.allclose(got, chunked, atol=1e-3 if dtype == torch.bfloat16 else 1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(images, n, device=device), atol=1e-5)


def test_decode_attention_equals_sdpa_with_grouped_heads_and_masks():
    """The decode step's own attention (grouped-query heads read in place, float32 scores) against SDPA with
    repeated heads: a batch whose rows see different keys (left padding, a sliding window), bool and
    additive masks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from monailabel_app.model.capture import decode_attention

    torch.manual_seed(2)
    batch, heads, kv, d, length = 3, 8, 2, 32, 40
    q = torch.randn(batch, heads, 1, d)
    k, v = torch.randn(batch, kv, length, d), torch.randn(batch, kv, length, d)
    seen = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    seen[0, ..., :7] = False  # left padding
    seen[1, ..., :25] = False  # a window of the last 15 keys
    seen[2, ..., 30:] = False  # cache slots not written yet

    class Module(torch.nn.Module):
        num_key_value_groups = heads // kv
        is_causal = True

    for mask in (seen, torch.zeros(seen.shape).masked_fill(~seen, float("-inf"))):
        ref = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.2)[0]
        got = decode_attention(q, k, v, mask, 0.2)
        assert got.shape == ref.shape == (batch, 1, heads, d)
        assert torch.allclose(got, ref, atol=1e-5)
