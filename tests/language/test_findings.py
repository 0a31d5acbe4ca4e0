"""The findings layer on a labelled corpus (``tests/findings_corpus``: English and Chinese sentences and short
reports written for this project) and on the cases a mask depends on: negation, uncertainty, two findings
in one sentence, thinking aloud."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from monailabel_app.language.findings import read_answer
from monailabel_app.language.report import Finding, format_findings, parse_report

CORPUS = os.path.join(ROOT, "tests", "findings_corpus")
FIELDS = ("kind", "side", "site", "certainty")


def corpus(language: str) -> list[tuple[int, str, list[dict]]]:
    cases = []
    with open(os.path.join(CORPUS, f"{language}.tsv"), encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            text, expected = line.rstrip("\n").split("\t")
            cases.append((n, text.replace("\\n", "\n"), _expected(expected)))
    return cases


def _expected(field: str) -> list[dict]:
    if field.strip() == "none":
        return []
    out = []
    for item in field.split(" ; "):
        kind, side, site, certainty, *extra = item.split()
        d = {"kind": "" if kind == "-" else kind.replace("_", " "), "side": "" if side == "-" else side, "site": site,
             "certainty": certainty}
        for e in extra:
            key, value = e.split("=")
            d[key] = value.replace("-", " ") if key == "seg" else float(value)
        out.append(d)
    return out


def site(f: Finding) -> str:
    if f.lobe == "lingula":
        return "lingula"
    if f.level:
        return f"{f.level}-{'lobe' if f.region == 'lobe' else 'zone'}"
    return "-"


def got(f: Finding) -> dict:
    return {"kind": f.kind, "side": f.side, "site": site(f), "certainty": f.certainty}


@pytest.mark.parametrize("language,least", [("en", 150), ("zh", 100)])
def test_field_accuracy_on_the_corpus(language, least):
    """Field accuracy over (kind, side, lobe/zone, certainty) of every expected finding (a missed or an
    extra finding counts all four fields wrong) >= 0.95; segments and sizes where labelled."""
    cases = corpus(language)
    assert len(cases) >= least
    right = total = 0
    wrong = []
    for n, text, expected in cases:
        found = read_answer(text).findings
        total += len(FIELDS) * max(len(found), len(expected))
        for e, f in zip(expected, found):
            g = got(f)
            right += sum(e[k] == g[k] for k in FIELDS)
            if "seg" in e:
                assert f.segment == e["seg"], (n, text)
            if "size" in e:
                assert f.size_mm == pytest.approx(e["size"]), (n, text)
        if [{k: e[k] for k in FIELDS} for e in expected] != [got(f) for f in found]:
            wrong.append((n, text, expected, [got(f) for f in found]))
    accuracy = right / total
    print(f"{language}: {len(cases)} cases, field accuracy {accuracy:.3f}, {len(wrong)} cases not exactly right")
    for w in wrong:
        print("  ", w)
    assert accuracy >= 0.95


@pytest.mark.parametrize("language", ["en", "zh"])
def test_no_negated_or_normal_statement_becomes_a_finding(language):
    for n, text, expected in corpus(language):
        if not expected:
            assert read_answer(text).findings == [], (n, text)


@pytest.mark.parametrize("text,kinds", [
    ("No pleural effusion or pneumothorax.", {"effusion"}),
    ("Pneumothorax has been ruled out.", {"pneumothorax"}),
    ("未见胸腔积液及气胸。", {"effusion", "pneumothorax"}),
    ("双肺未见明显实变，右肺中叶见结节。", {"consolidation"}),
])
def test_negated_mentions_are_kept_apart(text, kinds):
    answer = read_answer(text)
    assert {f.kind for f in answer.mentions if f.certainty == "negated"} == kinds
    assert not {f.kind for f in answer.findings} & kinds


@pytest.mark.parametrize("text", [
    "A right upper lobe nodule and a small left pleural effusion.",
    "右肺上叶结节和左侧胸腔积液。",
    "There is an 11 mm nodule in the right lower lobe and a 4 mm nodule in the left upper lobe.",
])
def test_two_findings_of_one_sentence_get_their_own_words(text):
    a, b = read_answer(text).findings
    assert a.span[1] <= b.span[0]  # disjoint, in order
    for f in (a, b):
        assert text[f.span[0]:f.span[1]] == f.text and f.text.strip() == f.text
    assert a.side != b.side


def test_a_single_finding_keeps_its_whole_sentence():
    """The phantom model's sentences: each finding's span is its sentence, as the masks were calibrated on."""
    text = format_findings([Finding(kind="nodule", side="right", level="upper"),
                            Finding(kind="effusion", side="left", level="lower")])
    found = parse_report(text)
    assert [(f.kind, f.side, f.level) for f in found] == [("nodule", "right", "upper"), ("effusion", "left", "lower")]
    assert [f.text for f in found] == ["nodule in the right upper zone.", "effusion in the left lower zone."]


def test_thinking_is_kept_and_never_read_for_findings():
    text = ("<unused94>thought\nThere could be a nodule in the right upper lobe, or a left effusion.<unused95>"
            "**Findings:** Consolidation in the left lower lobe.")
    answer = read_answer(text)
    assert [(f.kind, f.side) for f in answer.findings] == [("consolidation", "left")]
    assert "nodule in the right upper lobe" in answer.thinking
    assert answer.text.startswith("**Findings:**") and "<unused" not in answer.text
    f = answer.findings[0]
    assert text[f.span[0]:f.span[1]] == f.text  # spans stay those of the whole generated text
    # the answer stopped while thinking: nothing was said yet
    assert read_answer("<unused94>thought\nA right pleural effusion, maybe").findings == []


def test_sizes_descriptors_and_what_a_finding_may_be():
    (f,) = read_answer("Left upper lobe mass measuring 4.1 x 3.2 cm, spiculated, suspicious for malignancy.").findings
    assert f.kind == "mass" and f.size_mm == pytest.approx(41) and "spiculated margin" in f.descriptors
    assert f.suggests == ["malignancy"]
    (f,) = read_answer("左肺下叶基底段可见片状实变影，内见支气管充气征，邻近胸膜轻度增厚。").findings
    assert (f.kind, f.side, f.lobe, f.segment) == ("consolidation", "left", "lower", "basal")
    assert {"air bronchogram", "pleural thickening", "patchy"} <= set(f.descriptors)
    (f,) = read_answer("Patchy opacity in the left lower zone, likely atelectasis.").findings
    assert f.kind == "opacity" and f.suggests == ["atelectasis"]


def test_mixed_chinese_and_english():
    answer = read_answer("右肺上叶见一nodule，约8 mm。No pleural effusion.")
    assert answer.language == "zh"
    (f,) = answer.findings
    assert (f.kind, f.side, f.lobe, f.size_mm) == ("nodule", "right", "upper", 8.0)


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "monailabel_app.cli", "findings", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_findings_command(tmp_path):
    r = _cli(stdin="右肺中叶见斑片状模糊影，边界欠清。未见胸腔积液。")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["language"] == "zh" and [f["name"] for f in out["findings"]] == ["right middle lobe opacity"]
    assert [f["kind"] for f in out["negated"]] == ["effusion"]
    report = tmp_path / "report.txt"
    report.write_text("Possible right lower lobe pneumonia.", encoding="utf-8")
    (f,) = json.loads(_cli("-f", str(report)).stdout)["findings"]
    assert (f["kind"], f["certainty"]) == ("pneumonia", "possible")
    assert json.loads(_cli("--text", "The lungs are clear.").stdout)["findings"] == []
    report.write_bytes(b"\xff\xfe\x00bad")
    r = _cli("-f", str(report))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_how_much_of_an_answer_being_written_is_complete_sentences():
    from monailabel_app.language.findings import written_upto

    assert written_upto("Nodule in the right") == 0
    assert written_upto("Nodule in the right.") == 0  # a full stop at the very end may be more to come
    assert written_upto("Nodule in the right. Opac") == len("Nodule in the right.")
    assert written_upto("Mass of 1.5 cm in the left") == 0  # a decimal point ends nothing
    assert written_upto("右肺结节。左肺") == len("右肺结节。")


def test_sentences_kept_from_an_earlier_reading_give_what_a_fresh_scan_gives(monkeypatch):
    """Findings are kept per sentence (with the character before it): on the whole corpus, each text alone and
    all of them as one answer (sentences at new offsets, after new neighbours), read twice, equal a scan of
    the text itself without the kept ones; a caller changing a finding changes nothing kept."""
    from monailabel_app.language import findings as fm

    def fresh(text, a, b, language):
        return fm._scan_sentence(text, a, b, language)

    texts = [t for language in ("en", "zh") for _, t, _ in corpus(language)]
    texts += [" ".join(texts[:60]), "".join(texts[-60:]), "\n".join(texts[::7])]
    fm._findings_of_sentence.cache_clear()
    kept = [[read_answer(t) for t in texts] for _ in range(2)]
    assert fm._findings_of_sentence.cache_info().hits > len(texts)
    with monkeypatch.context() as m:
        m.setattr(fm, "_sentence_findings", fresh)
        scanned = [read_answer(t) for t in texts]
    for first, again, want in zip(*kept, scanned):
        assert first.mentions == want.mentions and again.mentions == want.mentions
        assert first.findings == want.findings and first.language == want.language
    a = read_answer("Small nodule in the right upper zone, likely granuloma.").findings[0]
    a.span, a.side = (0, 1), "left"
    a.descriptors.append("x")
    a.suggests.append("y")
    b = read_answer("Small nodule in the right upper zone, likely granuloma.").findings[0]
    assert b.side == "right" and b.span[1] > 1 and "x" not in b.descriptors and "y" not in b.suggests
