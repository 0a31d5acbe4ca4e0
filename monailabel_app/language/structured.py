"""The structured report (the seed's 结构化报告), built from the findings, in Chinese or English.

    structured_report(findings, names, model_text, language) -> {"language", "sections", "model_text", "text"}

Two sections, as radiology reports have them: 影像所见 / Findings (one line per finding, grouped by region:
lungs by lobe or zone, right before left, top to bottom; pleura; mediastinum and heart; bones) and
诊断意见 / Impression (one numbered line per finding, uncertain ones marked). Every line carries the
finding's label value and segment name (its mask), and the model's own sentence for it. Whatever
language the model answered in, the lines are written from the findings' codes in the asked language.
"""

from __future__ import annotations

from .findings import Finding

TITLES = {"zh": ("影像所见", "诊断意见"), "en": ("Findings", "Impression")}
REGIONS = {  # region code: (Chinese, English), in report order
    "lungs": ("肺", "Lungs"), "pleura": ("胸膜及胸腔", "Pleura"), "heart": ("纵隔及心脏", "Mediastinum and heart"),
    "bones": ("骨骼", "Bones"), "other": ("其他", "Other"),
}
REGION_OF = {"effusion": "pleura", "pneumothorax": "pleura", "pleural thickening": "pleura",
             "cardiomegaly": "heart", "lymphadenopathy": "heart", "fracture": "bones"}
KIND_NAMES = {  # kind: (Chinese, English)
    "nodule": ("结节", "nodule"), "mass": ("肿块", "mass"), "opacity": ("斑片影", "opacity"),
    "consolidation": ("实变", "consolidation"), "ground-glass opacity": ("磨玻璃影", "ground-glass opacity"),
    "effusion": ("胸腔积液", "pleural effusion"), "pneumothorax": ("气胸", "pneumothorax"),
    "atelectasis": ("肺不张", "atelectasis"), "cardiomegaly": ("心影增大", "cardiomegaly"),
    "edema": ("肺水肿", "pulmonary edema"), "pneumonia": ("肺炎", "pneumonia"), "emphysema": ("肺气肿", "emphysema"),
    "fibrosis": ("纤维条索影", "fibrosis"), "calcification": ("钙化灶", "calcification"), "cavity": ("空洞", "cavity"),
    "bronchiectasis": ("支气管扩张", "bronchiectasis"), "interstitial opacity": ("间质改变", "interstitial opacities"),
    "lymphadenopathy": ("淋巴结肿大", "lymphadenopathy"), "fracture": ("骨折", "fracture"),
    "pleural thickening": ("胸膜增厚", "pleural thickening"), "lesion": ("病灶", "lesion"), "": ("异常", "abnormality"),
}
DESCRIPTOR_NAMES = {
    "ill-defined margin": "边界欠清", "well-defined margin": "边界清楚", "spiculated margin": "边缘毛刺",
    "lobulated margin": "分叶状", "air bronchogram": "内见支气管充气征", "pleural thickening": "邻近胸膜增厚",
    "patchy": "片状", "solid": "实性", "part-solid": "部分实性", "calcified": "伴钙化", "cavitating": "伴空洞",
    "small": "少量", "large": "大量", "mild": "轻度", "moderate": "中等量", "loculated": "包裹性",
}
DIAGNOSIS_NAMES = {"malignancy": "恶性病变", "lung cancer": "肺癌", "neoplasm": "肿瘤", "metastasis": "转移",
                   "lymphoma": "淋巴瘤", "tuberculosis": "结核", "infection": "感染", "inflammation": "炎症",
                   "heart failure": "心力衰竭", "aspiration": "误吸", "viral pneumonia": "病毒性肺炎"}
AMOUNTS = ("small", "large", "mild", "moderate")
SIDE_NAMES = {"right": ("右", "right"), "left": ("左", "left"), "bilateral": ("双", "bilateral")}
LEVEL_NAMES = {"upper": "上", "middle": "中", "lower": "下"}
SEGMENT_NAMES = {"apical": "尖段", "posterior": "后段", "anterior": "前段", "apicoposterior": "尖后段", "superior": "背段",
                 "lateral": "外侧段", "medial": "内侧段", "superior lingular": "上舌段", "inferior lingular": "下舌段",
                 "anterior basal": "前基底段", "lateral basal": "外基底段", "posterior basal": "后基底段",
                 "medial basal": "内基底段", "basal": "基底段"}
_SIDE_ORDER = {"right": 0, "bilateral": 1, "left": 2, "": 3}
_LEVEL_ORDER = {"upper": 0, "middle": 1, "lower": 2, "": 3}
NOTHING = {"zh": ("双肺未见明确病灶。", "未见明显异常。"), "en": ("No focal finding.", "No focal abnormality.")}


def region(f: Finding) -> str:
    return REGION_OF.get(f.kind, "lungs")


def site_zh(f: Finding) -> str:
    """Where a finding is, in Chinese: 右肺上叶后段, 右肺中野 (a radiograph's zone), 左侧 (pleura), ..."""
    side = SIDE_NAMES.get(f.side, ("", ""))[0]
    if f.kind in ("effusion", "pneumothorax", "pleural thickening") and not f.level:
        return f"{side}侧" if side and side != "双" else ("双侧" if side else "")
    if f.lobe == "lingula":
        place = "左肺上叶舌段" if not f.segment or "lingular" not in f.segment else f"左肺{SEGMENT_NAMES[f.segment]}"
        return place
    lung = f"{side}肺" if side else ("肺" if f.level else "")
    if f.region == "lobe" and f.level:
        return f"{lung}{LEVEL_NAMES[f.level]}叶{SEGMENT_NAMES.get(f.segment, '')}"
    if f.level:
        return f"{lung}{LEVEL_NAMES[f.level]}野"
    return lung


def _site_en(f: Finding) -> str:
    side = SIDE_NAMES.get(f.side, ("", ""))[1]
    if f.lobe == "lingula":
        return f"{f.segment + ' segment of the ' if f.segment else ''}lingula"
    if f.region == "lobe" and f.level:
        lobe = f"{side} {f.level} lobe".strip()
        return f"{f.segment} segment of the {lobe}" if f.segment else lobe
    if f.level:
        return f"{side} {f.level} zone".strip()
    return side


def _size(f: Finding, language: str) -> str:
    if not f.size_mm:
        return ""
    mm = f"{f.size_mm:g} mm"
    return f"，大小约{mm}" if language == "zh" else f", {mm}"


def finding_line(f: Finding, language: str) -> str:
    """One finding as a report line, from its codes."""
    kind_zh, kind_en = KIND_NAMES.get(f.kind, (f.kind, f.kind))
    if language == "zh":
        site = site_zh(f)
        amount = "".join(DESCRIPTOR_NAMES[d] for d in f.descriptors if d in AMOUNTS)
        looks = [DESCRIPTOR_NAMES[d] for d in f.descriptors if d in DESCRIPTOR_NAMES and d not in AMOUNTS]
        seen = "见" if site and not site.endswith("侧") else ""
        line = f"{site}{seen}{amount}{kind_zh}{_size(f, 'zh')}"
        if looks:
            line += "，" + "，".join(looks)
        if f.suggests:
            line += "，考虑" + "、".join(DIAGNOSIS_NAMES.get(s, KIND_NAMES.get(s, (s, s))[0]) for s in f.suggests)
        return line + ("（可能）。" if f.certainty == "possible" else "。")
    site = _site_en(f)
    looks = [d for d in f.descriptors if d not in AMOUNTS]
    amount = next((d for d in f.descriptors if d in AMOUNTS), "")
    words = " ".join(w for w in (amount, site if site and f.region != "lobe" else "", kind_en) if w)
    line = f"{words} in the {site}" if site and f.region == "lobe" else words
    line = ("possible " if f.certainty == "possible" else "") + line + _size(f, "en")
    if looks:
        line += ", " + ", ".join(looks)
    if f.suggests:
        line += ", likely " + " or ".join(KIND_NAMES.get(s, (s, s))[1] for s in f.suggests)
    return line[:1].upper() + line[1:] + "."


def _order(item: tuple[int, Finding]) -> tuple:
    _, f = item
    return list(REGIONS).index(region(f)), _SIDE_ORDER.get(f.side, 3), _LEVEL_ORDER.get(f.level, 3), item[0]


def structured_report(findings: list[Finding], names: list[str], model_text: str, language: str) -> dict:
    """The structured report of ``findings`` (label k = findings[k-1], segment ``names[k-1]``) in ``language``."""
    language = "zh" if language == "zh" else "en"
    zh = language == "zh"
    items = sorted(enumerate(findings, start=1), key=_order)
    groups = []
    for k, f in items:
        code = region(f)
        if not groups or groups[-1]["region"] != code:
            groups.append({"region": code, "title": REGIONS[code][0 if zh else 1], "lines": []})
        groups[-1]["lines"].append({"label": k, "segment": names[k - 1], "text": finding_line(f, language),
                                    "model_text": f.text})
    impression = [{"label": k, "segment": names[k - 1], "text": f"{i}. {finding_line(f, language)}"}
                  for i, (k, f) in enumerate(items, start=1)]
    findings_title, impression_title = TITLES[language]
    lines = [f"{findings_title}{'：' if zh else ':'}"]
    for g in groups:
        lines.append(f"{g['title']}{'：' if zh else ':'}" + ("" if zh else " ") + ("" if zh else " ").join(
            line["text"] for line in g["lines"]))
    if not groups:
        lines.append(NOTHING[language][0])
    lines.append(f"{impression_title}{'：' if zh else ':'}")
    lines += [i["text"] for i in impression] or [NOTHING[language][1]]
    return {"language": language, "sections": [{"title": findings_title, "groups": groups},
                                                {"title": impression_title, "lines": impression}],
            "model_text": model_text, "text": "\n".join(lines)}
