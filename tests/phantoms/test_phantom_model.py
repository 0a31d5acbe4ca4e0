"""The shipped phantom model is what the recipe builds: same tokenizer, same architecture, labelled as a test model."""

import json
import os

from transformers import AutoTokenizer

from conftest import ROOT
from monailabel_app.phantoms import model as pm


def test_recipe_rebuilds_the_shipped_tokenizer_and_config():
    built = pm.build_tokenizer()
    shipped = AutoTokenizer.from_pretrained(pm.PHANTOM_MODEL_DIR)
    assert built.get_vocab() == shipped.get_vocab()
    text = "nodule in the right upper zone. effusion in the left lower zone."
    assert built(text)["input_ids"] == shipped(text)["input_ids"]
    for word in ("right", "left", "upper", "middle", "lower", "nodule", "opacity", "effusion"):
        assert len(shipped(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    cfg = json.load(open(os.path.join(pm.PHANTOM_MODEL_DIR, "config.json")))
    rebuilt = pm.build_config(built).to_dict()
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"]
    for key in ("mm_tokens_per_image", "image_token_index", "boi_token_index"):
        assert cfg[key] == rebuilt[key]
    assert cfg["mm_tokens_per_image"] == 256  # MedGemma's 16 x 16 grid
    assert cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"] == 16
    assert cfg["text_config"]["layer_types"] == rebuilt["text_config"]["layer_types"]


def test_labelled_as_a_test_model():
    assert "NOT MedGemma" in pm.MODEL_LABEL
    assert "NOT MedGemma" in pm.__doc__


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "sample-apps", "phantom-model", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


def test_training_fast_ct_encoding_matches_the_processor():
    """train.py tokenises CT prompts itself and resizes slices on the device: same ids as the processor,
    pixels within one grey level (2/255 after normalisation to -1..1)."""
    train = _train_module()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(pm.PHANTOM_MODEL_DIR)
    for n in (pm.CT_MAX_SLICES, 3):  # the full recipe and a curriculum slab
        assert train.check_fast_ct(processor, n=n) <= 2 / 255 + 1e-6


def test_follow_up_training_examples_teach_only_the_follow_up_answer():
    """train.py --follow-up-share: two-turn chats (the report, then "where is it?") whose labels cover the
    follow-up's answer alone, which names the first finding's place."""
    from transformers import AutoProcessor

    from monailabel_app.phantoms.films import make_phantom

    train = _train_module()
    processor = AutoProcessor.from_pretrained(pm.PHANTOM_MODEL_DIR)
    seed = next(s for s in range(50) if make_phantom(s).lesions)
    batch = train.encode_batch(processor, [seed], follow_up_share=1.0)
    tok = processor.tokenizer
    taught = tok.decode(batch["labels"][0][batch["labels"][0] != -100], skip_special_tokens=True)
    first = make_phantom(seed).findings[0]
    assert taught == f"it is in the {first.location}." and first.location
    assert make_phantom(seed).report in tok.decode(batch["input_ids"][0], skip_special_tokens=True)


def test_chinese_characters_are_single_tokens_and_english_is_tokenised_as_before():
    shipped = AutoTokenizer.from_pretrained(pm.PHANTOM_MODEL_DIR)
    text = "右肺中野见结节。左肺下野见胸腔积液。"
    ids = shipped(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and shipped.decode(ids) == text  # one token per character, decoded exactly
    for question in (*pm.QUESTIONS_ZH, *pm.SEED_CHAIN_ZH, pm.DESCRIBE_ZH):
        assert shipped.unk_token_id not in shipped(question, add_special_tokens=False)["input_ids"]
        assert all(len(shipped(c, add_special_tokens=False)["input_ids"]) == 1 for c in question if ord(c) > 0x2E7F)


def test_chinese_training_examples():
    """train.py --zh-share: Chinese questions (or 请用中文回答) answered with the Chinese report; Chinese follow-ups
    about "it" answered with its place, and the seed's density-and-margin question with its look."""
    from transformers import AutoProcessor

    from monailabel_app.language.report import format_findings
    from monailabel_app.phantoms.films import make_phantom

    train = _train_module()
    processor = AutoProcessor.from_pretrained(pm.PHANTOM_MODEL_DIR)
    tok = processor.tokenizer
    seed = next(s for s in range(50) if make_phantom(s).lesions)
    ph = make_phantom(seed)
    batch = train.encode_batch(processor, [seed], zh_share=1.0)
    taught = tok.decode(batch["labels"][0][batch["labels"][0] != -100], skip_special_tokens=True)
    question, language = train.question_and_language(seed, 1.0, pm.QUESTIONS, pm.QUESTIONS_ZH)
    assert taught == format_findings(ph.findings, language)
    languages = {train.question_and_language(s, 1.0, pm.QUESTIONS, pm.QUESTIONS_ZH)[1] for s in range(40)}
    assert languages == {"zh", "en"}  # mostly Chinese; "Please answer in English." answered in English
    first = ph.findings[0]
    assert train.follow_up_answer(ph.findings, "zh", "它在哪里？") == f"它位于{format_findings([first], 'zh')[:4]}。"
    assert train.follow_up_answer(ph.findings, "zh", pm.DESCRIBE_ZH).endswith(train.LOOKS_ZH[first.kind])
