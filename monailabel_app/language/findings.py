"""Findings from an answer or a report, English, Chinese or both mixed.

    read_answer(text) -> Answer(findings, mentions, thinking, language)

1. **Thinking** MedGemma 1.5 writes between ``<unused94>`` and ``<unused95>`` is set aside (kept as
   ``thinking``, never read for findings); character positions stay those of the whole text.
2. **Sentences** end at ``. ; 。 ； ! ? ！ ？`` and line breaks (not at a decimal point); markdown marks
   and list bullets are noise.
3. **Terms** of :mod:`vocabulary` are found in each sentence, longest first: kinds, sites, descriptors,
   ConText triggers, pseudo-triggers and terminators.
4. **Certainty** (ConText, Harkema et al. 2009): a negation or uncertainty trigger covers the kind terms in
   its scope (forward to the sentence's end, backward to its start, or both), stopped by a terminator
   ("but", "另见", ...); the nearest covering trigger decides: ``present``, ``possible`` or ``negated``.
   A sentence ending in a question mark is ``possible``.
5. **Findings**: the sentence splits into clauses at commas, "and", "和", "以及", "、"; a clause naming a
   kind that is not negated starts a finding, clauses without a kind add their site and descriptors to the
   finding before them (or, leading the sentence, after them); a finding without a side takes the side of
   the one before it in the sentence ("right lower lobe consolidation and effusion"). Pleural thickening
   after another finding describes it. A sentence about "it" with a site names an earlier finding's place.
6. Each finding's **span** is its sentence when the sentence names one finding, else its clauses, so
   that two findings of one sentence get their own tokens and masks. A finding repeated (same kind and
   site, e.g. in the impression after the findings) is kept once, where first said.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field

from . import vocabulary as v

THINK_START, THINK_END = "<unused94>", "<unused95>"
PRESENT = "present"
_CJK = re.compile(r"[\u3400-\u9fff]")
_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|[;；。！？!?\n]")
_CLAUSE_SEP = re.compile(r"[,，、:：]|\band\b|\bas well as\b|以及|和|(?<![累涉波])及|(?P<with>\bwith\b|伴有|伴|合并)",
                         re.IGNORECASE)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)(?:\s*(?:x|×|\*)\s*(\d+(?:\.\d+)?))?(?:\s*(?:x|×|\*)\s*(\d+(?:\.\d+)?))?\s*"
                   r"(mm|cm|毫米|厘米)", re.IGNORECASE)
_BOX = re.compile(r"\[\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\]")  # [y0, x0, y1, x1]


@dataclass
class Finding:
    """One finding: what (kind), where (side, lobe or zone level, segment), how sure, the words that said it."""

    kind: str = ""
    side: str = ""
    level: str = ""  # upper / middle / lower: of the lobe, or of the radiograph's zone
    text: str = ""
    score: float = 1.0
    span: tuple[int, int] = (0, 0)  # characters of the answer that said it
    region: str = ""  # "zone" (radiograph) or "lobe" (CT); from the text when not given
    lobe: str = ""  # upper / middle / lower / lingula, when a lobe is named
    segment: str = ""  # e.g. "posterior basal"
    size_mm: float | None = None
    certainty: str = PRESENT  # present / possible / negated
    descriptors: list[str] = field(default_factory=list)
    suggests: list[str] = field(default_factory=list)  # what the text says it may be ("..., likely atelectasis")
    language: str = "en"

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """The box MedGemma gives in this finding's sentence, ``[y0, x0, y1, x1]`` in 0..1000 of the model's
        input square, when there is a valid one."""
        m = _BOX.search(self.text or "")
        if not m:
            return None
        y0, x0, y1, x1 = (float(x) for x in m.groups())
        return (y0, x0, y1, x1) if 0 <= y0 < y1 <= 1000 and 0 <= x0 < x1 <= 1000 else None

    @property
    def location(self) -> str:
        region = self.region or "zone"
        if not self.region and self.text and re.search(r"\blobes?\b|叶", self.text, re.IGNORECASE):
            region = "lobe"
        if self.lobe == "lingula":
            return "lingula"
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

    def key(self) -> tuple:
        return self.kind, self.side, self.level, self.lobe, self.segment

    def as_json(self) -> dict:
        return {"kind": self.kind, "side": self.side, "level": self.level, "lobe": self.lobe, "segment": self.segment,
                "region": self.region, "location": self.location, "name": self.name, "size_mm": self.size_mm,
                "certainty": self.certainty, "descriptors": self.descriptors, "suggests": self.suggests,
                "language": self.language,
                "text": self.text, "span": list(self.span)}


@dataclass
class Answer:
    findings: list[Finding]  # present and possible, in order, each once
    mentions: list[Finding]  # every kind named, negated ones included
    thinking: str = ""  # what the model wrote between <unused94> and <unused95> (never read for findings)
    language: str = "en"  # of the answer outside the thinking: "zh" when it has Chinese, else "en"
    text: str = ""  # the answer outside the thinking

    def as_json(self) -> dict:
        return {"language": self.language, "findings": [f.as_json() for f in self.findings],
                "negated": [f.as_json() for f in self.mentions if f.certainty == v.NEGATED],
                "thinking": self.thinking}


def detect_language(text: str) -> str:
    """``zh`` when the text has Chinese characters (mixed answers included), else ``en``."""
    return "zh" if _CJK.search(text or "") else "en"


# ---- the term scanner -------------------------------------------------------------------------------

# category of each vocabulary table (vocabulary.<TABLE>_EN and <TABLE>_ZH)
CATEGORIES = {"KINDS": "kind", "DESCRIPTORS": "descriptor", "SIDES": "side", "LOBES": "lobe", "SEGMENTS": "segment",
              "ZONES": "zone", "TRIGGERS": "trigger", "PSEUDO": "pseudo", "TERMINATORS": "terminator",
              "ANAPHORS": "anaphor", "INTERPRETERS": "interpreter", "DIAGNOSES": "diagnosis"}


def _tables() -> dict[str, list[tuple[str, object]]]:
    """term -> [(category, value)] over both languages (a term may be in several tables)."""
    out: dict[str, list[tuple[str, object]]] = {}
    for table, cat in CATEGORIES.items():
        for language in ("EN", "ZH"):
            terms = getattr(v, f"{table}_{language}")
            for term, val in (terms.items() if isinstance(terms, dict) else ((t, None) for t in terms)):
                out.setdefault(term.lower(), []).append((cat, val))
    return out


_TERMS = _tables()
_KIND_TERMS = {t: e for t, e in _TERMS.items() if any(cat == "kind" for cat, _ in e)}


def _pattern(term: str) -> str:
    if _CJK.search(term) or not re.search(r"[a-z]", term):
        return re.escape(term)
    body = r"[\s-]+".join(re.escape(w) for w in re.split(r"[\s]+", term))
    return rf"(?<![a-z0-9]){body}(?![a-z0-9])"


def _scanner(terms) -> re.Pattern:
    return re.compile("|".join(f"(?:{_pattern(t)})" for t in sorted(terms, key=len, reverse=True)), re.IGNORECASE)


# kinds are scanned on their own too: in Chinese a site can run into a kind ("双肺气肿": 双肺 + 肺气肿)
_SCANNER, _KIND_SCANNER = _scanner(_TERMS), _scanner(_KIND_TERMS)


@dataclass
class _Term:
    start: int
    end: int
    cat: str
    value: object


def _scan(text: str, start: int, end: int) -> list[_Term]:
    found: dict[tuple, _Term] = {}
    for scanner, kinds_only in ((_SCANNER, False), (_KIND_SCANNER, True)):
        for m in scanner.finditer(text, start, end):
            key = re.sub(r"[\s-]+", " ", m.group(0).lower())
            entries = _TERMS.get(key) or _TERMS.get(m.group(0).lower()) or _TERMS.get(key.replace(" ", "-"), [])
            for cat, val in entries:
                if not kinds_only or cat == "kind":
                    found.setdefault((m.start(), m.end(), cat), _Term(m.start(), m.end(), cat, val))
    # a kind word inside a longer descriptor names no finding ("uniform density" is not an opacity)
    described = [t for t in found.values() if t.cat == "descriptor"]
    return sorted((t for t in found.values() if t.cat != "kind" or not any(
        d.start <= t.start and t.end <= d.end and (d.start, d.end) != (t.start, t.end) for d in described)),
        key=lambda t: (t.start, t.end))


# ---- certainty (ConText) ------------------------------------------------------------------------------

def _certainty(mention: _Term, terms: list[_Term], clauses: list[tuple], question: bool) -> str:
    """The nearest trigger whose scope covers ``mention``, stopped by terminators; else present. A trigger
    looking back ("...不除外", "... cannot be excluded") stays in its own clause when that clause names
    what it is about ("结节，肺癌不除外": the cancer is uncertain, not the nodule)."""
    best, best_dist = None, None
    stops = [t for t in terms if t.cat == "terminator"]
    back_stops = stops + [_Term(c[0], c[0], "terminator", None) for c in clauses
                          if any(c[0] <= t.start and t.end <= c[1] and t.cat in ("kind", "diagnosis") for t in terms)]
    for t in terms:
        if t.cat != "trigger" or t.value is None:
            continue
        category, direction = t.value
        if t.end <= mention.start and direction in (v.FORWARD, v.BOTH):
            if any(t.end <= s.start and s.end <= mention.start for s in stops):
                continue
            dist = mention.start - t.end
        elif t.start >= mention.end and direction in (v.BACKWARD, v.BOTH):
            if any(mention.end <= s.start and s.end <= t.start for s in back_stops):
                continue
            dist = t.start - mention.end
        else:
            continue
        if best_dist is None or dist < best_dist:
            best, best_dist = category, dist
    return best or (v.POSSIBLE if question else PRESENT)


# ---- sentences and clauses ------------------------------------------------------------------------------

def _sentences(text: str, start: int, end: int):
    pos = start
    for m in _SENTENCE_END.finditer(text, start, end):
        yield pos, m.end()
        pos = m.end()
    if pos < end:
        yield pos, end


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    """(a, b) without surrounding white space, separators and markdown marks."""
    noise = " \t\r\n*#>-•,，、:："
    while a < b and text[a] in noise:
        a += 1
    while b > a and text[b - 1] in " \t\r\n*#>,，、:：":
        b -= 1
    return a, b


def _clauses(text: str, a: int, b: int) -> list[tuple[int, int, bool]]:
    """(start, end, after "with") of each clause of the sentence text[a:b]."""
    cuts, pos, with_ = [], a, False
    for m in _CLAUSE_SEP.finditer(text, a, b):
        cuts.append((pos, m.start(), with_))
        pos, with_ = m.end(), bool(m.group("with"))
    cuts.append((pos, b, with_))
    return [c for c in cuts if text[c[0]:c[1]].strip(" \t*#")]


def _size_mm(text: str) -> float | None:
    sizes = []
    for m in _SIZE.finditer(text):
        unit = 10.0 if m.group(4).lower() in ("cm", "厘米") else 1.0
        sizes += [float(g) * unit for g in m.groups()[:3] if g]
    return max(sizes) if sizes else None


@dataclass
class _Group:
    clauses: list[tuple[int, int]]
    kind: str = ""
    certainty: str = PRESENT
    suggests: list[str] = field(default_factory=list)


def _clause_kind(terms: list[_Term], certainty: dict) -> tuple[str, str, bool]:
    """(kind, certainty, named any kind) of one clause: its first noun kind that is not negated, else a
    modifier ("nodular"); a clause whose kinds are all negated gives that kind as negated."""
    kinds = [t for t in terms if t.cat == "kind"]
    if not kinds:
        return "", PRESENT, False
    for modifiers in (False, True):
        for t in kinds:
            if str(t.value).startswith("~") == modifiers and certainty[id(t)] != v.NEGATED:
                return str(t.value).lstrip("~"), certainty[id(t)], True
    return str(kinds[0].value).lstrip("~"), v.NEGATED, True


def _interprets(terms: list[_Term], certainty: str) -> bool:
    """The clause says what the finding before it may be: an interpreter before its kind or diagnosis
    ("likely atelectasis", "考虑肺炎"), or an uncertain kind or diagnosis with no place of its own
    ("不排除肺炎", "肺癌不除外")."""
    what = next((t for t in terms if t.cat in ("kind", "diagnosis")), None)
    if what is None:
        return False
    if any(t.cat == "interpreter" and t.end <= what.start for t in terms):
        return True
    uncertain = certainty == v.POSSIBLE or any(t.cat == "trigger" and t.value[0] == v.POSSIBLE for t in terms)
    return uncertain and not any(t.cat in ("side", "lobe", "segment", "zone") for t in terms)


def _site(finding: Finding, terms: list[_Term]) -> None:
    """Side, level, lobe, segment and region from a finding's terms, in the order written: the first level
    word names the level ("the right upper and middle lobes": upper), a lobe or segment makes it a lobe."""
    sides = [t.value for t in terms if t.cat == "side"] + [t.value[0] for t in terms if t.cat == "lobe" and t.value[0]]
    if "bilateral" in sides or ("right" in sides and "left" in sides):
        finding.side = "bilateral"
    elif sides:
        finding.side = sides[0]
    levels = []
    for t in terms:
        if t.cat == "lobe":
            levels.append(t.value[1])
        elif t.cat == "segment":
            finding.segment = finding.segment or t.value[0]
            if t.value[1]:
                levels.append(t.value[1])
        elif t.cat == "zone":
            levels.append(t.value)
    if not levels:
        return
    lobed = any(t.cat in ("lobe", "segment") for t in terms)
    if "lingula" in levels and levels[0] == "upper":  # "左肺上叶舌段": the lingula, the more precise
        levels.insert(0, "lingula")
    finding.region = "lobe" if lobed else "zone"
    finding.lobe = levels[0] if lobed else ""
    finding.level = "middle" if levels[0] == "lingula" else levels[0]
    if finding.lobe == "lingula" and not finding.side:
        finding.side = "left"


def _descriptors(terms: list[_Term], kind: str) -> list[str]:
    out = []
    for t in terms:
        if t.cat == "descriptor" and t.value != kind and t.value not in out:
            out.append(t.value)
    return out


def _sentence_findings(text: str, a: int, b: int, language: str) -> list[Finding]:
    """The findings of the sentence text[a:b]. A sentence reads the same wherever it stands: what the scanners
    see of it is its own characters and the one before it (their look-behinds are one character wide), so
    the findings are kept by those (:func:`_findings_of_sentence`), and an answer read again as it grows,
    or a repeated sentence, is not scanned twice."""
    before = text[a - 1] if a > 0 else ""
    offset = a - len(before)
    return [dataclasses.replace(f, span=(f.span[0] + offset, f.span[1] + offset), descriptors=list(f.descriptors),
                                suggests=list(f.suggests))
            for f in _findings_of_sentence(before + text[a:b], len(before), language)]


@functools.lru_cache(maxsize=4096)
def _findings_of_sentence(text: str, a: int, language: str) -> tuple[Finding, ...]:
    """The findings of the sentence text[a:] (text[:a]: the character before it, or none); never mutated."""
    return tuple(_scan_sentence(text, a, len(text), language))


def _scan_sentence(text: str, a: int, b: int, language: str) -> list[Finding]:
    a, b = _strip(text, a, b)
    if a >= b:
        return []
    terms = _scan(text, a, b)
    pseudo = [t for t in terms if t.cat == "pseudo"]
    terms = [t for t in terms if not any(p.start <= t.start and t.end <= p.end for p in pseudo) or t.cat == "pseudo"]
    question = text[b - 1] in "?？"
    clauses = _clauses(text, a, b)
    certainty = {id(t): _certainty(t, terms, clauses, question) for t in terms if t.cat == "kind"}
    groups: list[_Group] = []
    pending: list[tuple[int, int]] = []  # leading kind-less clauses: they belong to the next finding
    for c0, c1, after_with in clauses:
        c = (c0, c1)
        cterms = [t for t in terms if c0 <= t.start and t.end <= c1]
        kind, sure, named = _clause_kind(cterms, certainty)
        open_group = groups and groups[-1].certainty != v.NEGATED
        if named and open_group and after_with and kind not in v.INDEPENDENT_KINDS:
            named = False  # "nodule with surrounding ground-glass": it describes the nodule
        if open_group and sure != v.NEGATED and _interprets(cterms, sure):
            groups[-1].clauses.append(c)  # "opacity ..., likely atelectasis": what that opacity may be
            groups[-1].suggests += [str(t.value).lstrip("~") for t in cterms if t.cat in ("kind", "diagnosis")]
            continue
        if kind == "pleural thickening" and open_group:
            named = False  # it describes the finding before it
        if named:
            groups.append(_Group(pending + [c], kind, sure))
            pending = []
        elif open_group:
            groups[-1].clauses.append(c)
        else:
            pending.append(c)
    if not groups:
        anaphor = any(t.cat == "anaphor" and t.start - a <= 12 for t in terms)
        site = [t for t in terms if t.cat in ("side", "lobe", "zone", "segment")]
        if anaphor and site:  # "it is in the right upper zone."
            groups.append(_Group(pending, "", PRESENT))
        else:
            return []
    found, previous_side = [], ""
    for g in groups:
        own = [t for t in terms if any(c[0] <= t.start and t.end <= c[1] for c in g.clauses)]
        f = Finding(kind=g.kind, certainty=g.certainty, language=language)
        _site(f, own)
        if g.kind in v.UNSIDED_KINDS:
            f.side = ""
        elif g.certainty != v.NEGATED:
            f.side = f.side or previous_side
        previous_side = f.side or previous_side
        f.descriptors = _descriptors(own, g.kind)
        f.suggests = g.suggests
        start, end = (a, b) if len(groups) == 1 else _strip(text, g.clauses[0][0], g.clauses[-1][1])
        f.span, f.text = (start, end), text[start:end]
        f.size_mm = _size_mm(f.text)
        found.append(f)
    return found


def written_upto(text: str) -> int:
    """How much of ``text``, an answer still being written, is complete sentences: up to the end of its last
    sentence end that more text follows (0 when none); :func:`read_answer` of that much gives findings that
    the rest of the answer does not change."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]
    return ends[-1] if ends else 0


def read_answer(text: str) -> Answer:
    """The findings of ``text`` (any language), its mentions (negated ones included) and its thinking."""
    text = text or ""
    thinking, end = "", len(text)
    regions = [(0, len(text))]
    if THINK_START in text:
        s = text.index(THINK_START)
        e = text.find(THINK_END, s)
        thinking = text[s + len(THINK_START): e if e >= 0 else len(text)].strip()
        regions = [(0, s)] + ([(e + len(THINK_END), end)] if e >= 0 else [])  # unfinished thinking: no answer
    answer_text = "".join(text[a:b] for a, b in regions).strip()
    language = detect_language(answer_text)
    mentions: list[Finding] = []
    for a, b in regions:
        for s, e in _sentences(text, a, b):
            mentions += _sentence_findings(text, s, e, detect_language(text[s:e]) if language == "zh" else "en")
    findings, seen = [], set()
    for f in mentions:
        if f.certainty == v.NEGATED or f.key() in seen:
            continue
        seen.add(f.key())
        findings.append(f)
    return Answer(findings, mentions, thinking, language, answer_text)
