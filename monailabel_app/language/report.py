"""The findings format: write reference reports and parse any model's answer into findings.

The phantom model answers in one sentence per finding, e.g.
``"nodule in the right upper zone. effusion in the left lower zone."`` or ``"no focal abnormality."``.
MedGemma answers in free text, English or Chinese; :mod:`language.findings` reads both (negation and
uncertainty, several findings in one sentence, lobes and segments, sizes, thinking set aside).
"""

from __future__ import annotations

from .findings import Finding, read_answer
from .structured import finding_line

__all__ = ["Finding", "format_findings", "parse_report", "read_answer", "unique_names", "NO_FINDINGS"]

SIDES = ("right", "left")
LEVELS = ("upper", "middle", "lower")
KINDS = ("opacity", "nodule", "effusion")
NO_FINDINGS = "no focal abnormality."
NO_FINDINGS_ZH = "未见明显异常。"


def format_findings(findings: list[Finding], language: str = "en") -> str:
    """The phantom model's report text for these findings (in the order given): one sentence each,
    "nodule in the right upper zone." or, in Chinese, "右肺上野见结节。"."""
    if language == "zh":  # the structured report's own Chinese line: 右肺上野见结节。
        return "".join(finding_line(f, "zh") for f in findings) or NO_FINDINGS_ZH
    if not findings:
        return NO_FINDINGS
    return " ".join(f.sentence() for f in findings)


def parse_report(text: str) -> list[Finding]:
    """Findings named in ``text`` (English, Chinese or mixed), in order, present or possible, each with the
    character span of the words that said it (:func:`language.findings.read_answer` has the rest:
    negated mentions, thinking, language)."""
    return read_answer(text).findings


def unique_names(findings: list[Finding]) -> list[str]:
    """Segment names, with ``#2``, ``#3`` added where two findings would share a name."""
    names, seen = [], {}
    for f in findings:
        seen[f.name] = seen.get(f.name, 0) + 1
        names.append(f.name if seen[f.name] == 1 else f"{f.name} #{seen[f.name]}")
    return names
