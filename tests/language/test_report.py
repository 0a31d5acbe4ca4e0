from monailabel_app.language.report import NO_FINDINGS, Finding, format_findings, parse_report, unique_names


def test_phantom_format_round_trip():
    fs = [Finding("nodule", "right", "upper"), Finding("effusion", "left", "lower")]
    text = format_findings(fs)
    assert text == "nodule in the right upper zone. effusion in the left lower zone."
    parsed = parse_report(text)
    assert [(f.kind, f.side, f.level) for f in parsed] == [("nodule", "right", "upper"), ("effusion", "left", "lower")]
    for f in parsed:
        assert text[f.span[0] : f.span[1]] == f.text
    assert [f.name for f in parsed] == ["right upper zone nodule", "left lower zone effusion"]
    assert parse_report(NO_FINDINGS) == [] and format_findings([]) == NO_FINDINGS


def test_free_text_negations_and_locations():
    text = (
        "There is a right middle lobe opacity concerning for pneumonia.\n"
        "No pneumothorax. Heart size is normal.\n"
        "- Small left pleural effusion at the base\n"
        "Bilateral apical nodules."
    )
    fs = parse_report(text)
    assert [(f.kind, f.side, f.level) for f in fs] == [
        ("opacity", "right", "middle"), ("effusion", "left", "lower"), ("nodule", "bilateral", "upper"),
    ]
    assert fs[0].location == "right middle lobe" and fs[0].name == "right middle lobe opacity"
    assert all(text[f.span[0] : f.span[1]] == f.text for f in fs)


def test_unique_names():
    fs = [Finding("nodule", "right", "upper"), Finding("nodule", "right", "upper"), Finding("opacity")]
    assert unique_names(fs) == ["right upper zone nodule", "right upper zone nodule #2", "opacity"]
