"""The shipped phantom model is what the recipe builds: same tokenizer, same architecture, labelled as a test model."""

import json
import os

from transformers import AutoTokenizer

from conftest import ROOT
from monailabel_app import phantom_model as pm


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

    from monailabel_app.phantoms import make_phantom

    train = _train_module()
    processor = AutoProcessor.from_pretrained(pm.PHANTOM_MODEL_DIR)
    seed = next(s for s in range(50) if make_phantom(s).lesions)
    batch = train.encode_batch(processor, [seed], follow_up_share=1.0)
    tok = processor.tokenizer
    taught = tok.decode(batch["labels"][0][batch["labels"][0] != -100], skip_special_tokens=True)
    first = make_phantom(seed).findings[0]
    assert taught == f"it is in the {first.location}." and first.location
    assert make_phantom(seed).report in tok.decode(batch["input_ids"][0], skip_special_tokens=True)
