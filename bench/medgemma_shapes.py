"""A model in MedGemma-4B's shapes with random weights, built from config (no download), with a
processor that speaks to it: the phantom model's tokenizer and chat template, a 896 px image processor
(the torchvision one, as ``AutoProcessor`` gives for MedGemma where torchvision is installed)
and 256 image tokens per image, as MedGemma's. For timing and memory only: its answers mean nothing.
"""

from __future__ import annotations

import json
import os

import torch

MEDGEMMA_4B = dict(
    text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
              num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
              rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=256,
              max_position_embeddings=131072, rope_local_base_freq=10000.0, rope_theta=1000000.0),
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=896, patch_size=14, vision_use_head=False),
    tokens_per_image=256,
)
GLOBAL_EVERY = 6  # every 6th text layer attends globally, the rest through a 1024-token window


def processor_896():
    from transformers import AutoTokenizer

    from monailabel_app.phantoms.model import PHANTOM_MODEL_DIR, build_processor

    tok = AutoTokenizer.from_pretrained(PHANTOM_MODEL_DIR)
    return build_processor(tok, image_size=MEDGEMMA_4B["vision"]["image_size"],
                           tokens_per_image=MEDGEMMA_4B["tokens_per_image"], torchvision=True)


def config(tokenizer):
    from transformers import Gemma3Config

    s = MEDGEMMA_4B
    n = s["text"]["num_hidden_layers"]
    types = ["full_attention" if (i + 1) % GLOBAL_EVERY == 0 else "sliding_attention" for i in range(n)]
    ids = tokenizer.convert_tokens_to_ids
    cfg = Gemma3Config(text_config={**s["text"], "layer_types": types}, vision_config=s["vision"],
                       mm_tokens_per_image=s["tokens_per_image"], image_token_index=ids("<image_soft_token>"),
                       boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"))
    return cfg


def global_layers(cfg) -> list[int]:
    return [i for i, t in enumerate(cfg.text_config.layer_types) if t == "full_attention"]


def build(device: str = "cuda", dtype=torch.bfloat16, attn: str = "sdpa"):
    """(model, processor): random weights (the projector too: transformers initialises it to zero)."""
    from transformers import Gemma3ForConditionalGeneration

    processor = processor_896()
    cfg = config(processor.tokenizer)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(cfg, dtype=dtype)
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
    model.eval()
    tok = processor.tokenizer
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def grounding(cfg) -> dict:
    """The maps' settings without calibration: every global layer, radiographs direct, CT rolled out over
    85 slices (what ``loading.load_grounding`` defaults to for MedGemma)."""
    layers = global_layers(cfg)
    return {"layers": layers, "rollout": False, "threshold": 0.5,
            "ct": {"layers": layers, "rollout": True, "max_slices": 85, "threshold": 0.5}}


def save(model, processor, folder: str) -> str:
    """A model folder like a downloaded MedGemma (safetensors, processor, :func:`grounding` as
    grounding.json)."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, "grounding.json"), "w") as f:
        json.dump(grounding(model.config), f)
    return folder
