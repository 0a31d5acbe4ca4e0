"""The findings format: write reference reports and parse any model's answer into findings.

The phantom model answers in one sentence per finding, e.g.
``"nodule in the right upper zone. effusion in the left lower zone."`` or ``"no focal abnormality."``.
MedGemma answers in free text; the parser is written for both: it splits the answer into sentences (or
list items), drops negated ones ("no pneumothorax", "without effusion", "normal heart size") and keeps
each sentence that names a finding kind or a lung location, with its side, level and character span (so
the generation step can find the tokens that said it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SIDES = ("right", "left")
LEVELS = ("upper", "middle", "lower")
KINDS = ("opacity", "nodule", "effusion")
NO_FINDINGS = "no focal abnormality."

# words that name a finding (phantom kinds first, then common chest radiograph / CT findings)
_KIND_WORDS = {
    "opacity": "opacity", "opacities": "opacity", "opacification": "opacity",
    "nodule": "nodule", "nodules": "nodule", "nodular": "nodule", "mass": "mass",
    "effusion": "effusion", "effusions": "effusion",
    "consolidation": "consolidation", "pneumothorax": "pneumothorax", "atelectasis": "atelectasis",
    "cardiomegaly": "cardiomegaly", "infiltrate": "infiltrate", "infiltrates": "infiltrate",
    "edema": "edema", "oedema": "edema", "pneumonia": "pneumonia", "fracture": "fracture",
    "emphysema": "emphysema", "fibrosis": "fibrosis", "lesion": "lesion", "lesions": "lesion",
    "calcification": "calcification", "granuloma": "granuloma", "hernia": "hernia",
}
_LEVEL_WORDS = {
    "upper": "upper", "apex": "upper", "apical": "upper", "apices": "upper",
    "middle": "middle", "mid": "middle", "lingula": "middle", "lingular": "middle",
    "lower": "lower", "base": "lower", "basal": "lower", "basilar": "lower", "bases": "lower",
}
_NEGATION = re.compile(
    r"^\s*(no|not|without|negative for|absence of|there is no|there are no|normal|unremarkable|clear)\b",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"[^.;\n]+[.;]?")
_BOX = re.compile(r"\[\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\]")  # [y0, x0, y1, x1]
_WORD = re.compile(r"[a-z]+")


@dataclass
class Finding:
    """One finding: what (kind), where (side, level), the sentence that said it and how sure."""

    kind: str = ""
    side: str = ""
    level: str = ""
    text: str = ""
    score: float = 1.0
    span: tuple[int, int] = (0, 0)  # characters of the answer that said it
    region: str = ""  # "zone" (radiograph) or "lobe" (CT); from the text when not given

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """The box MedGemma gives in this finding's sentence, ``[y0, x0, y1, x1]`` in 0..1000 of the model's
        input square, when there is a valid one."""
        m = _BOX.search(self.text or "")
        if not m:
            return None
        y0, x0, y1, x1 = (float(v) for v in m.groups())
        return (y0, x0, y1, x1) if 0 <= y0 < y1 <= 1000 and 0 <= x0 < x1 <= 1000 else None

    @property
    def location(self) -> str:
        region = self.region or "zone"
        if not self.region and self.text and re.search(r"\blobes?\b", self.text, re.IGNORECASE):
            region = "lobe"
        words = [w for w in (self.side, self.level) if w]
        if not words:
            return ""
        return " ".join(words + ([region] if self.level else ["lung"]))

    @property
    def name(self) -> str:
        """Segment name, e.g. ``right upper zone nodule``."""
        return " ".join(w for w in (self.location, self.kind or "finding") if w)

    def sentence(self) -> str:
        return f"{self.kind} in the {self.side} {self.level} {self.region or 'zone'}."


def format_findings(findings: list[Finding]) -> str:
    """The phantom model's report text for these findings (in the order given)."""
    if not findings:
        return NO_FINDINGS
    return " ".join(f.sentence() for f in findings)


def parse_report(text: str) -> list[Finding]:
    """Findings named in ``text``, in order, each with the character span of its sentence."""
    findings = []
    for m in _SENTENCE.finditer(text):
        sentence = m.group(0)
        body = sentence.strip(" \t*-•0123456789).:")
        if not body or _NEGATION.match(body):
            continue
        words = _WORD.findall(body.lower())
        kind = next((_KIND_WORDS[w] for w in words if w in _KIND_WORDS), "")
        side = next((w for w in words if w in SIDES), "")
        if "bilateral" in words or ("right" in words and "left" in words):
            side = "bilateral"
        level = next((_LEVEL_WORDS[w] for w in words if w in _LEVEL_WORDS), "")
        if not kind and not side:
            continue
        start = m.start() + len(sentence) - len(sentence.lstrip())
        end = m.start() + len(sentence.rstrip())
        findings.append(Finding(kind=kind, side=side, level=level, text=text[start:end], span=(start, end)))
    return findings


def unique_names(findings: list[Finding]) -> list[str]:
    """Segment names, with ``#2``, ``#3`` added where two findings would share a name."""
    names, seen = [], {}
    for f in findings:
        seen[f.name] = seen.get(f.name, 0) + 1
        names.append(f.name if seen[f.name] == 1 else f"{f.name} #{seen[f.name]}")
    return names
