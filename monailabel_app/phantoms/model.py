"""The phantom model: a tiny real Gemma 3 for tests and demos. It is NOT MedGemma.

It is a ``Gemma3ForConditionalGeneration`` (SigLIP vision tower, multimodal projector, Gemma 3 text
decoder with sliding-window and global layers) with its own byte-fallback BPE tokenizer, a
``Gemma3Processor`` and the Gemma 3 chat template. Its image input is 224 px with 14 px patches, so its
image tokens form the same 16 x 16 grid as MedGemma's (256 tokens per image): one mapping path serves
both. It is trained by ``sample-apps/phantom-model/train.py`` on synthetic phantoms
(:mod:`monailabel_app.phantoms.films`) to answer in the project's findings format; its weights ship inside
the package (``monailabel_app/models/phantom-gemma3``) so that the demo and the tests need no download.

It answers in English or in Chinese ("右肺上野见结节。"), as asked. It reads chest X-rays (one image) and chest CTs (up to ``CT_MAX_SLICES`` slices in the MedGemma 1.5
recipe: each slice an RGB of three HU windows followed by ``SLICE n``), answering in the same format:
zones for radiographs, lobes for CT ("mass in the right upper lobe.").
"""

from __future__ import annotations

import os

from ..language import vocabulary
from ..language.asking import ANSWER_IN
from ..language.report import KINDS, LEVELS, NO_FINDINGS, NO_FINDINGS_ZH, SIDES, Finding, format_findings
from ..language.structured import KIND_NAMES

PHANTOM_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "phantom-gemma3")
MODEL_LABEL = "phantom-gemma3 (synthetic test model, NOT MedGemma)"
DEFAULT_QUESTION = "Describe the findings in this chest X-ray."
QUESTIONS = (
    DEFAULT_QUESTION,
    "What are the findings?",
    "Find any abnormality in this chest radiograph and say where it is.",
)
CT_QUESTION = "Describe the findings in this chest CT."
CT_QUESTIONS = (CT_QUESTION, "What are the findings in this CT?", "Find any lung lesion in this CT and name its lobe.")
CT_MAX_SLICES = 20  # the phantom model reads up to 20 slices per CT (MedGemma 1.5: 85)
# Chinese: questions it is taught (answered with Chinese reports, "右肺上野见结节。"), its default questions,
# follow-ups about "it" and the seed's chain of questions
QUESTIONS_ZH = ("请描述这张胸片的异常。", "请描述这张胸片的所见。", "这张胸片有什么异常？", "请评估双肺是否存在病变。")
DEFAULT_QUESTION_ZH = "请描述这张胸片的所见。"
CT_QUESTIONS_ZH = ("请描述这次胸部CT的所见。", "这个CT有什么异常？", "请找出肺部病灶并说明所在肺叶。")
CT_QUESTION_ZH = CT_QUESTIONS_ZH[0]
FOLLOW_UPS_ZH = ("它在哪里？", "这个异常在哪里？", "第一个发现在哪里？")
DESCRIBE_ZH = "这个异常的密度和边界特征如何？"
SEED_CHAIN_ZH = ("右肺上叶有什么异常？", "这个异常的密度和边界特征如何？", "结合上述发现，最可能的诊断是什么？")
IMAGE_SIZE, PATCH_SIZE, TOKENS_PER_IMAGE = 224, 14, 256

SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]

# The Gemma 3 chat template (system text folded into the first user turn; images as <start_of_image>).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def chinese_characters() -> list[str]:
    """Every CJK character (and full-width mark) of the Chinese the model is taught or asked, and of the
    findings vocabulary: each becomes one token of the tokenizer (deterministic order)."""
    texts = [*QUESTIONS_ZH, DEFAULT_QUESTION_ZH, *CT_QUESTIONS_ZH, *FOLLOW_UPS_ZH, DESCRIBE_ZH, *SEED_CHAIN_ZH,
             NO_FINDINGS_ZH, *ANSWER_IN.values(), "它位于", "密度均匀，边界清楚。密度不均，边界欠清。呈液体密度。",
             "叶野肺见、：；（）！", "右左", "上中下",
             *(KIND_NAMES[k][0] for k in ("nodule", "opacity", "effusion", "mass", "consolidation", "ground-glass opacity"))]
    for name in dir(vocabulary):
        table = getattr(vocabulary, name)
        if name.endswith("_ZH"):
            texts += list(table)
    return sorted({c for t in texts for c in t if ord(c) > 0x2E7F})


def _corpus() -> list[str]:
    """Text the tokenizer is fitted on: every answer the model is taught, the prompts, common words."""
    texts = list(QUESTIONS) + [NO_FINDINGS, "SLICE", "user", "model", "system"]
    for kind in KINDS:
        for side in SIDES:
            for level in LEVELS:
                texts.append(format_findings([Finding(kind=kind, side=side, level=level)]))
    texts += [
        "right middle lobe opacity, left lower lobe consolidation, pleural effusion, pneumothorax, "
        "cardiomegaly, atelectasis, nodule, mass, lesion, normal, no acute cardiopulmonary process, "
        "the lungs are clear, heart size is normal, bilateral, apex, base, CT, X-ray, chest, findings",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 [ ] , . : ; ( ) - ? !",
    ]
    return texts * 50


def build_tokenizer():
    """A GemmaTokenizer over a small byte-fallback BPE fitted on :func:`_corpus` (deterministic).

    The BPE is trained inside GemmaTokenizer's own pipeline (" " -> "\u2581"), with merges learned only
    inside words, so every word of the findings vocabulary is one token and the saved vocabulary and
    merges tokenise exactly as at training time.
    """
    import json

    from tokenizers import pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend = GemmaTokenizer()._tokenizer
    # learn merges within words only ("\u2581" starts a word), as SentencePiece does for Gemma
    backend.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(byte_tokens) + 400,
        special_tokens=SPECIAL_TOKENS + byte_tokens,
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = GemmaTokenizer(
        vocab=model["vocab"],
        merges=merges,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "start_of_turn_token": "<start_of_turn>",
            "end_of_turn_token": "<end_of_turn>",
        },
    )
    # Chinese: one token per character (added tokens, matched before the BPE, so English is tokenised as before)
    tok.add_tokens(chinese_characters())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer=None, image_size: int = IMAGE_SIZE, tokens_per_image: int = TOKENS_PER_IMAGE,
                    torchvision: bool = False):
    """The Gemma 3 processor (PIL image processor; ``torchvision``: the torchvision one, which can run
    on a GPU)."""
    from transformers import Gemma3Processor

    if torchvision:
        from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor as ImageProcessor
    else:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil as ImageProcessor

    tokenizer = tokenizer or build_tokenizer()
    image_processor = ImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )


def build_config(tokenizer):
    """Gemma 3 config: SigLIP 224/14 (16x16 tokens), 4 text layers (sliding, global, sliding, global)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,  # attention scale 1/sqrt(head_dim), as MedGemma (256 = its head_dim)
        max_position_embeddings=32768,  # a 20-slice CT is ~5,300 tokens, 85 slices ~22,000
        # longer than its 20-slice CT prompts (~5,300 tokens): the X-ray-trained sliding layer 2, which
        # carries most of this tiny model's grounding, must see every slice. MedGemma-4B's 1024 window
        # does not; there only the global layers can be used for CT maps (capture.py drops the others).
        sliding_window=8192,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<bos>"),
        eos_token_id=[ids("<eos>"), ids("<end_of_turn>")],
    )
    vision = SiglipVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<bos>"),
        eos_token_id=[ids("<eos>"), ids("<end_of_turn>")],
    )
