"""medgemma-label calibrate: references from phantoms, boxes.csv and COCO JSON; the chosen settings
localise better than the worst ones, and are written beside the model without losing the other entry."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from monailabel_app.errors import InputError
from monailabel_app.jobs import calibrate
from monailabel_app.phantoms.films import make_phantom


@pytest.fixture(scope="module")
def before(reader):
    return json.loads(json.dumps(reader.info.grounding))


@pytest.fixture(scope="module")
def found(reader, before):
    refs = calibrate.phantom_references(12)
    return calibrate.calibrate(reader, refs, max_layers=1, thresholds=(0.5,), log=lambda *_: None)


def test_calibration_prefers_layers_that_look_at_the_lesion(found):
    best = found["best"]
    assert found["studies"] == 12 and found["lesions"] >= 12
    # one layer at a time, direct and rolled out: 2 x (4 + all) settings
    assert found["tried"] == 10
    assert best["pointing"] >= 0.8, found  # layers 0 and 3 alone point at the lesion for < 0.1
    assert 0 < best["dice"] <= 1


def test_calibration_leaves_the_reader_as_it_was(reader, found, before):
    assert reader.info.grounding == before


def _phantom_folder(tmp_path, seeds):
    rows = []
    for seed in seeds:
        ph = make_phantom(seed)
        name = f"p{seed}.png"
        Image.fromarray(ph.image).save(tmp_path / name)
        for les in ph.lesions:
            ys, xs = np.nonzero(les.mask)
            rows.append((name, int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1,
                         f"{les.kind} in the {les.zone} zone."))
    return rows


def test_boxes_csv_and_coco_json_give_the_same_references(tmp_path):
    rows = _phantom_folder(tmp_path, [20001, 20002, 20004])
    csv_dir, coco_dir = tmp_path / "csv", tmp_path / "coco"
    csv_dir.mkdir()
    coco_dir.mkdir()
    with open(csv_dir / "boxes.csv", "w") as f:
        f.write("image,y0,x0,y1,x1,finding\n")
        f.writelines(f"{n},{y0},{x0},{y1},{x1},{t}\n" for n, y0, x0, y1, x1, t in rows)
    names = sorted({r[0] for r in rows})
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "categories": [{"id": 1, "name": ""}],
            "annotations": [{"id": k, "image_id": names.index(n), "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}
                            for k, (n, y0, x0, y1, x1, _) in enumerate(rows)]}
    (coco_dir / "boxes.json").write_text(json.dumps(coco))
    for d in (csv_dir, coco_dir):
        for n in names:
            os.symlink(tmp_path / n, d / n)
    a, b = calibrate.box_references(str(csv_dir)), calibrate.box_references(str(coco_dir))
    assert [r.name for r in a] == [r.name for r in b] == names
    for ra, rb in zip(a, b):
        assert all(np.array_equal(x, y) for x, y in zip(ra.masks, rb.masks))
    assert all(p is not None for r in a for p in r.places) and all(p is None for r in b for p in r.places)
    box = a[0].masks[0]
    ys, xs = np.nonzero(box)
    assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a filled rectangle


def test_bad_box_files_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="no boxes.csv"):
        calibrate.box_references(str(tmp_path))
    (tmp_path / "boxes.csv").write_text("image,y0,x0,y1,x1\na.png,1,2,three,4\n")
    with pytest.raises(InputError, match="line 2"):
        calibrate.box_references(str(tmp_path))


def test_cli_calibrates_from_boxes_and_merges_the_json(tmp_path):
    from monailabel_app.cli import main

    rows = _phantom_folder(tmp_path, [20005, 20006, 20007, 20008])
    with open(tmp_path / "boxes.csv", "w") as f:
        f.write("image,y0,x0,y1,x1,finding\n")
        f.writelines(f"{n},{y0},{x0},{y1},{x1},{t}\n" for n, y0, x0, y1, x1, t in rows)
    out = tmp_path / "grounding.json"
    out.write_text(json.dumps({"ct": {"layers": [3], "rollout": True, "max_slices": 20}}))
    assert main(["calibrate", "--data", str(tmp_path), "--max-layers", "1", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["ct"] == {"layers": [3], "rollout": True, "max_slices": 20}  # the CT entry is kept
    assert written["layers"] and isinstance(written["rollout"], bool) and 0 < written["threshold"] < 1
    assert "calibrated" in written["note"]


def test_a_chinese_entry_is_calibrated_from_chinese_answers_and_written_beside_the_method(reader, before, tmp_path):
    refs = calibrate.phantom_references(6)
    zh = calibrate.calibrate(reader, refs, max_layers=1, thresholds=(0.5, 0.6), log=lambda *_: None, language="zh")
    assert reader.info.grounding == before
    assert zh["language"] == "zh"
    # the entry's attention method only (it is recorded before the answer's language is known): 5 x 2
    assert zh["tried"] == 10 and {r["rollout"] for r in zh["results"]} == {before["rollout"]}
    assert zh["best"]["pointing"] >= 0.6, zh
    out = tmp_path / "grounding.json"
    out.write_text(json.dumps(before))
    calibrate.write_grounding(None, str(out), zh, ct=False, data="phantoms")
    written = json.loads(out.read_text())
    assert written["zh"]["layers"] == zh["best"]["layers"] and written["zh"]["threshold"] == zh["best"]["threshold"]
    assert "rollout" not in written["zh"] and "answers in zh" in written["zh"]["note"]
    # the entry itself and the CT entry (with its own Chinese entry) are untouched
    assert {k: v for k, v in written.items() if k != "zh"} == {k: v for k, v in before.items() if k != "zh"}


def test_chinese_answers_are_mapped_with_the_chinese_entry_and_english_ones_are_not(reader):
    from monailabel_app.io.xray import Geometry, Radiograph

    ph = make_phantom(1)  # two nodules, read as two findings
    study = Radiograph(ph.image, Geometry.plain(*ph.image.shape))
    settings = reader.info.grounding
    saved = dict(settings)
    try:
        settings.update(layers=[3], threshold=0.6)  # what the Chinese entry below asks for, as the entry itself
        plain = reader.read(study, language="zh")
        settings.clear()
        settings.update(saved, zh={"layers": [3], "threshold": 0.6})
        zh = reader.read(study, language="zh")
        en = reader.read(study, language="en")
    finally:
        settings.clear()
        settings.update(saved)
    assert zh.findings and zh.answer_language == "zh" and zh.model["layers"] == [3]
    assert zh.generation.attention.shape[1] == 1  # layer 2 was recorded too, and left out of the maps
    for a, b in zip(zh.heatmaps, plain.heatmaps):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert (zh.labels == plain.labels).all()
    assert en.model["layers"] == saved["layers"]
