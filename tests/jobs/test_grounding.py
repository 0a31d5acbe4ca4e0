"""Zone accuracy and grounding of the phantom model on held-out seeds (the issue's targets)."""

import pytest

from conftest import TEST_SEEDS
from monailabel_app.jobs.evaluation import evaluate, table, zone_priors


@pytest.fixture(scope="module")
def result(reader):
    return evaluate(reader, TEST_SEEDS[:150], zone_priors(range(20000, 20300)))


def test_phantom_model_names_the_right_zone(result):
    assert result["lesions"] >= 150
    assert result["zone_accuracy"] >= 0.95, table(result)
    assert result["empty_images_answered_empty"] >= 0.9, table(result)


def test_raw_attention_points_at_the_lesion(result):
    print(table(result))
    m = result["maps"]
    assert m["a_raw_attention"]["pointing"] >= 0.75, table(result)
    # the maps must beat chance by far; the words-only baseline is measured and printed, not asserted
    assert m["a_raw_attention"]["pointing"] > 10 * m["d_chance"]["pointing"]
    assert m["b_final_masks"]["dice"] > 10 * m["d_chance"]["dice"]


def test_final_masks_beat_the_words_alone(result):
    """Issue 4's radiograph target on 150 held-out phantoms: the final masks point at the lesion for
    >= 0.95 of lesions and their Dice beats the text-only baseline by >= 0.05."""
    m = result["maps"]
    assert m["b_final_masks"]["pointing"] >= 0.95, table(result)
    assert m["b_final_masks"]["dice"] >= m["c_text_only"]["dice"] + 0.05, table(result)


def test_final_masks_outline_the_lesion(result):
    """Issue 19's radiograph target on 150 held-out phantoms: the final mask's centre lies inside the lesion
    (strict pointing; 0.955 measured on this CPU in fp32, target 0.95, asserted with two lesions' margin for
    other CPUs' fp32 kernels) and Dice >= 0.75 (0.834 measured; the attention's own masks gave 0.535)."""
    m = result["maps"]["b_final_masks"]
    assert m["pointing_strict"] >= 0.94, table(result)
    assert m["dice"] >= 0.75, table(result)


def test_masks_come_from_the_image_not_the_words(reader, result):
    """Control: the same method on each phantom's lesion-free twin, the model made to say its original
    words, must lose >= 0.3 of the pointing game (the gates alone do not find the lesion)."""
    seeds = TEST_SEEDS[:24]  # the control loses 0.7 of pointing: 24 phantoms show it with room to spare
    priors = zone_priors(range(20000, 20300))
    real = evaluate(reader, seeds, priors)
    control = evaluate(reader, seeds, priors, control=True)
    assert control["zone_accuracy"] == real["zone_accuracy"]  # the same words were said
    assert control["maps"]["b_final_masks"]["pointing"] <= real["maps"]["b_final_masks"]["pointing"] - 0.3, (
        table(real) + "\ncontrol:\n" + table(control))


def test_evaluation_detects_a_model_that_does_not_look(reader, monkeypatch):
    """Swap every heatmap for a flat map: pointing must collapse (the metric can fail)."""
    import numpy as np

    from monailabel_app.grounding import study_maps

    monkeypatch.setattr(study_maps, "finding_grid", lambda gen, rows, grid, image=0: np.ones((grid, grid), np.float32))
    flat = evaluate(reader, TEST_SEEDS[:20], zone_priors(range(20000, 20100)))
    assert flat["maps"]["a_raw_attention"]["pointing"] < 0.3
