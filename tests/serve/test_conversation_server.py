"""Multi-turn reading through a real MONAI Label server, and the 3D Slicer module's logic classes
(``plugins/slicer/MedGemma/MedGemmaLib``, plain Python) against it."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import ROOT
from monailabel_app.phantoms import ct as ct_phantoms
from monailabel_app.phantoms.films import make_phantom

sys.path.insert(0, os.path.join(ROOT, "plugins", "slicer", "MedGemma"))
from MedGemmaLib import Cancelled, InferJob, MedGemmaClient, ServerError, StudyConversation  # noqa: E402

TTL = 12  # seconds a conversation may stay idle on this test server
MAX_OPEN = 3


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv_studies")
    for seed in (11, 7, 23, 42):
        Image.fromarray(make_phantom(seed).image).save(d / f"phantom_{seed}.png")
    ct_phantoms.save(ct_phantoms.make_ct_phantom(5), str(d / "ct_5.nii.gz"), "LPS")
    return d


@pytest.fixture(scope="module")
def server(studies):
    from monailabel_app.serve.server import ServerProcess

    with ServerProcess(str(studies), conf={"conversation_ttl_s": TTL, "conversations": MAX_OPEN}) as s:
        yield s


@pytest.fixture(scope="module")
def mg(server):
    return MedGemmaClient(server.url)


def _label(result):
    return sitk.GetArrayFromImage(sitk.ReadImage(result.label_file))


def test_first_turn_and_two_follow_ups_each_with_findings_and_masks(mg):
    chat = StudyConversation(mg, "phantom_11")  # two nodules, upper zones
    first = chat.ask()
    assert first.conversation["turn"] == 1 and chat.conversation_id
    assert first.findings and set(first.label_names) == {f.name for f in first.findings}
    prompt = first.raw["latencies"]["prompt_tokens"]
    for turn, question in ((2, "Is it on the right?"), (3, "Describe the findings in this chest X-ray.")):
        res = chat.ask(question)
        assert res.conversation["id"] == chat.conversation_id and res.conversation["turn"] == turn
        assert [h["question"] for h in chat.history][-1] == question and len(chat.history) == turn
        # only the new turn was computed: the image and earlier turns came from the kept context
        assert res.raw["latencies"]["decoder_reused_tokens"] > prompt
        assert res.raw["latencies"]["prompt_tokens"] > prompt
        arr = _label(res)
        assert arr.shape == make_phantom(11).image.shape and arr.dtype == np.uint8  # a label file every turn
        assert set(res.label_names) == {f.name for f in res.findings}
        for f in res.findings:
            assert (arr == f.label).any() and f.peak
    assert any(t.findings for t in chat.turns[1:])  # follow-ups come with findings and masks too


def test_a_conversation_in_chinese(mg):
    """The Slicer module's logic asks in Chinese: the Chinese report and structured report, then a Chinese
    follow-up about "it" answered with its place, from the kept context."""
    chat = StudyConversation(mg, "phantom_11")
    first = chat.ask(language="zh")
    assert first.language == "zh" and "见" in first.report and first.structured_report.startswith("影像所见")
    again = chat.ask("它在哪里？")
    assert again.conversation["turn"] == 2 and again.raw["latencies"]["decoder_reused_tokens"] > 0
    assert again.report.startswith("它位于") and again.findings
    assert (again.findings[0].side, again.raw["findings"][0]["level"]) == (first.findings[0].side,
                                                                          first.raw["findings"][0]["level"])


def test_ct_follow_up_keeps_slices_and_rollout(mg):
    chat = StudyConversation(mg, "ct_5")
    first = chat.ask()
    again = chat.ask("Describe the findings in this chest CT.")
    assert again.conversation["turn"] == 2 and again.modality == "ct"
    assert again.raw["latencies"]["decoder_reused_tokens"] > first.raw["latencies"]["prompt_tokens"]
    assert again.raw["model"]["attention"] == "rollout"  # the slices' rollout products came with the context
    assert again.findings and _label(again).shape == _label(first).shape
    for f in again.findings:  # where the module jumps: the strongest slice, inside the finding's range
        assert f.strongest_slice is not None and f.world_z_mm is not None
        lo, hi = again.raw["findings"][f.label - 1]["slice_range"]["world_z_mm"]
        assert lo <= f.world_z_mm <= hi


def test_heatmap_is_a_float_volume_in_the_label_geometry(mg):
    res = mg.infer("ct_5")
    path = mg.heatmap(res)
    heat, label = sitk.ReadImage(path), sitk.ReadImage(res.label_file)
    assert heat.GetSize() == label.GetSize()
    assert np.allclose(heat.GetOrigin(), label.GetOrigin()) and np.allclose(heat.GetSpacing(), label.GetSpacing())
    assert np.allclose(heat.GetDirection(), label.GetDirection())
    arr = sitk.GetArrayFromImage(heat)
    assert arr.dtype == np.float32 and arr.max() > 0


def test_unknown_expired_and_mismatched_conversations_are_clear_errors(mg, server):
    with pytest.raises(ServerError) as e:
        mg.infer("phantom_7", "Where?", conversation="0123456789abcdef")
    assert e.value.status == 404 and "unknown or expired conversation" in e.value.message
    chat = StudyConversation(mg, "phantom_7")
    assert chat.ask().conversation["expires_after_idle_s"] == TTL
    with pytest.raises(ServerError) as e:  # a conversation is about one image
        mg.infer("phantom_23", "And here?", conversation=chat.conversation_id)
    assert e.value.status == 422 and "phantom_7" in e.value.message
    time.sleep(TTL + 1)
    with pytest.raises(ServerError) as e:
        chat.ask("Still there?")
    assert e.value.status == 404
    assert mg.info()["models"]["medgemma"]  # the server keeps serving


def test_open_conversations_are_bounded(mg):
    chats = [StudyConversation(mg, f"phantom_{s}") for s in (7, 23, 42, 11)]
    for c in chats:
        c.ask()
    with pytest.raises(ServerError) as e:  # the least recently used went first
        chats[0].ask("Where is it?")
    assert e.value.status == 404
    assert chats[-1].ask("Where is it?").conversation["turn"] == 2


def test_server_errors_are_readable_and_jobs_can_be_cancelled(mg):
    with pytest.raises(ServerError) as e:
        mg.infer("no_such_image")
    assert 400 <= e.value.status < 500 and e.value.message
    with pytest.raises(ServerError) as e:
        mg.infer("phantom_7", max_new_tokens=100000)
    assert e.value.status == 422 and "max_new_tokens" in e.value.message
    job = InferJob(mg.infer, "phantom_7")
    job.cancel()
    assert job.done
    with pytest.raises(Cancelled):
        job.result()
    done = InferJob(mg.infer, "phantom_42")
    assert done.result(timeout=120).report
    down = MedGemmaClient("http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ServerError, match="cannot reach"):
        down.info()
