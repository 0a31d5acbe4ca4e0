"""The findings vocabulary, English and Chinese: what a finding is (kind), where (side, lobe, segment,
zone), how it looks (descriptors) and how sure the writer is (ConText triggers).

Each table maps a term to its value; English terms match whole words (case-insensitive), Chinese terms
match as written. The longest term wins where several start at the same character ("ground-glass
opacity" over "opacity", "未见明显" over "未见").

Kinds (the code is what ``Finding.kind`` holds and the DICOM export codes):

| kind | English | 中文 |
|---|---|---|
| nodule | nodule, nodular | 结节 |
| mass | mass | 肿块, 占位 |
| opacity | opacity, opacification, density, shadow, infiltrate | 斑片影, 模糊影, 片状影, 阴影, 高密度影, 浸润影 |
| consolidation | consolidation, airspace disease | 实变 |
| ground-glass opacity | ground-glass (opacity), GGO | 磨玻璃影, 磨玻璃密度 |
| effusion | (pleural) effusion, hydrothorax | 胸腔积液, 积液 |
| pneumothorax | pneumothorax | 气胸 |
| atelectasis | atelectasis, collapse | 肺不张 |
| cardiomegaly | cardiomegaly, enlarged heart / cardiac silhouette | 心影增大, 心脏增大, 心影扩大 |
| edema | (pulmonary) edema / oedema | 肺水肿 |
| pneumonia | pneumonia | 肺炎 |
| emphysema | emphysema | 肺气肿 |
| fibrosis | fibrosis, fibrotic, scarring | 纤维化, 纤维条索影, 索条影 |
| calcification | calcification, calcified granuloma | 钙化, 钙化灶 |
| cavity | cavity, cavitation | 空洞 |
| bronchiectasis | bronchiectasis | 支气管扩张 |
| interstitial opacity | reticular / interstitial opacities | 网格影, 间质改变 |
| lymphadenopathy | lymphadenopathy, enlarged lymph nodes | 淋巴结肿大 |
| fracture | fracture | 骨折 |
| pleural thickening | pleural thickening | 胸膜增厚 |
| lesion | lesion, abnormality | 病灶, 异常 |

Pleural thickening is a finding on its own ("mild left apical pleural thickening") and a descriptor of
another finding in the same sentence ("...实变影，邻近胸膜轻度增厚").
"""

from __future__ import annotations

# kind terms; a value starting with "~" is a modifier ("nodular opacity" is an opacity): it names the
# kind only when no noun in the clause does
KINDS_EN = {
    "nodule": "nodule", "nodules": "nodule", "micronodule": "nodule", "micronodules": "nodule",
    "nodular": "~nodule", "mass": "mass", "masses": "mass", "mass-like": "~mass",
    "opacity": "opacity", "opacities": "opacity", "opacification": "opacity", "density": "opacity",
    "densities": "opacity", "shadow": "opacity", "shadowing": "opacity", "infiltrate": "opacity",
    "infiltrates": "opacity", "airspace opacity": "opacity", "airspace opacities": "opacity",
    "consolidation": "consolidation", "consolidations": "consolidation", "consolidative": "~consolidation",
    "airspace disease": "consolidation",
    "ground-glass opacity": "ground-glass opacity", "ground-glass opacities": "ground-glass opacity",
    "ground glass opacity": "ground-glass opacity", "ground glass opacities": "ground-glass opacity",
    "ground-glass": "~ground-glass opacity", "ground glass": "~ground-glass opacity",
    "ggo": "ground-glass opacity", "ggos": "ground-glass opacity",
    "effusion": "effusion", "effusions": "effusion", "hydrothorax": "effusion",
    "pneumothorax": "pneumothorax", "pneumothoraces": "pneumothorax",
    "atelectasis": "atelectasis", "atelectatic": "~atelectasis", "collapse": "atelectasis",
    "cardiomegaly": "cardiomegaly", "enlarged heart": "cardiomegaly", "enlarged cardiac silhouette": "cardiomegaly",
    "cardiac enlargement": "cardiomegaly", "heart is enlarged": "cardiomegaly",
    "cardiac silhouette is enlarged": "cardiomegaly", "heart size is enlarged": "cardiomegaly",
    "edema": "edema", "oedema": "edema",
    "pneumonia": "pneumonia", "emphysema": "emphysema", "emphysematous": "~emphysema",
    "fibrosis": "fibrosis", "fibrotic": "~fibrosis", "scarring": "fibrosis", "scar": "fibrosis",
    "calcification": "calcification", "calcifications": "calcification", "calcified granuloma": "calcification",
    "granuloma": "calcification",
    "cavity": "cavity", "cavitation": "cavity", "cavitary": "~cavity",
    "bronchiectasis": "bronchiectasis",
    "reticular opacities": "interstitial opacity", "reticular opacity": "interstitial opacity",
    "interstitial opacities": "interstitial opacity", "interstitial markings": "interstitial opacity",
    "lymphadenopathy": "lymphadenopathy", "enlarged lymph nodes": "lymphadenopathy",
    "fracture": "fracture", "fractures": "fracture",
    "pleural thickening": "pleural thickening",
    "lesion": "lesion", "lesions": "lesion", "abnormality": "lesion",
}
KINDS_ZH = {
    "结节": "nodule", "结节状": "~nodule", "小结节": "nodule", "肿块": "mass", "占位": "mass", "团块": "mass",
    "斑片影": "opacity", "斑片状影": "opacity", "模糊影": "opacity", "片状影": "opacity", "片影": "opacity",
    "阴影": "opacity", "高密度影": "opacity", "浸润影": "opacity", "渗出影": "opacity", "渗出": "opacity",
    "实变": "consolidation", "实变影": "consolidation",
    "磨玻璃影": "ground-glass opacity", "磨玻璃密度影": "ground-glass opacity", "磨玻璃密度": "~ground-glass opacity",
    "磨玻璃": "~ground-glass opacity",
    "胸腔积液": "effusion", "积液": "effusion", "气胸": "pneumothorax", "肺不张": "atelectasis",
    "心影增大": "cardiomegaly", "心脏增大": "cardiomegaly", "心影扩大": "cardiomegaly", "心影明显增大": "cardiomegaly",
    "膨胀不全": "atelectasis", "肺水肿": "edema", "肺炎": "pneumonia", "肺气肿": "emphysema",
    "纤维化": "fibrosis", "纤维条索影": "fibrosis", "索条影": "fibrosis", "条索影": "fibrosis",
    "钙化": "calcification", "钙化灶": "calcification", "空洞": "cavity", "支气管扩张": "bronchiectasis",
    "网格影": "interstitial opacity", "间质改变": "interstitial opacity", "淋巴结肿大": "lymphadenopathy",
    "骨折": "fracture", "胸膜增厚": "pleural thickening", "病灶": "lesion", "异常": "lesion",
}

# how a finding looks: the descriptors the seed's reports use (code: English words)
DESCRIPTORS_EN = {
    "ill-defined": "ill-defined margin", "poorly defined": "ill-defined margin", "indistinct": "ill-defined margin",
    "well-defined": "well-defined margin", "well-circumscribed": "well-defined margin",
    "spiculated": "spiculated margin", "lobulated": "lobulated margin",
    "air bronchogram": "air bronchogram", "air bronchograms": "air bronchogram",
    "pleural thickening": "pleural thickening", "patchy": "patchy", "solid": "solid", "part-solid": "part-solid",
    "calcified": "calcified", "cavitating": "cavitating", "small": "small", "large": "large", "mild": "mild",
    "moderate": "moderate", "trace": "small", "loculated": "loculated",
    # how dense: these name no finding ("uniform density" is not an opacity)
    "uniform density": "homogeneous", "homogeneous density": "homogeneous", "homogeneous": "homogeneous",
    "heterogeneous density": "heterogeneous", "heterogeneous": "heterogeneous", "soft-tissue density": "soft-tissue density",
    "soft tissue density": "soft-tissue density", "fluid density": "fluid density", "fat density": "fat density",
}
DESCRIPTORS_ZH = {
    "边界欠清": "ill-defined margin", "边界不清": "ill-defined margin", "边缘模糊": "ill-defined margin",
    "边界清楚": "well-defined margin", "边界清晰": "well-defined margin", "毛刺": "spiculated margin",
    "分叶": "lobulated margin", "支气管充气征": "air bronchogram", "空气支气管征": "air bronchogram",
    "胸膜增厚": "pleural thickening", "胸膜轻度增厚": "pleural thickening", "斑片状": "patchy", "片状": "patchy",
    "实性": "solid", "部分实性": "part-solid", "少量": "small", "大量": "large", "轻度": "mild", "中等量": "moderate",
    "密度均匀": "homogeneous", "密度不均": "heterogeneous", "密度不均匀": "heterogeneous", "液体密度": "fluid density",
}

# kinds that have no side: a side named before them in the sentence is not theirs
UNSIDED_KINDS = ("cardiomegaly",)
# after "with" / "伴", these kinds are findings of their own ("mass with obstructive atelectasis"); other
# kinds there describe the finding before them ("nodule with surrounding ground-glass")
INDEPENDENT_KINDS = ("effusion", "pneumothorax", "cardiomegaly", "atelectasis", "lymphadenopathy", "fracture", "edema")

# where: side
SIDES_EN = {"right": "right", "left": "left", "bilateral": "bilateral", "bilaterally": "bilateral",
            "both": "bilateral", "bibasilar": "bilateral", "bibasal": "bilateral"}
SIDES_ZH = {"右": "right", "左": "left", "双肺": "bilateral", "两肺": "bilateral", "双侧": "bilateral", "两侧": "bilateral",
            "双下肺": "bilateral", "两下肺": "bilateral"}
# lobes (value: side or "", lobe); the abbreviations carry their side
LOBES_EN = {"upper lobe": ("", "upper"), "middle lobe": ("", "middle"), "lower lobe": ("", "lower"),
            "upper lobes": ("", "upper"), "middle lobes": ("", "middle"), "lower lobes": ("", "lower"),
            "lingula": ("left", "lingula"), "lingular": ("left", "lingula"),
            "rul": ("right", "upper"), "rml": ("right", "middle"), "rll": ("right", "lower"),
            "lul": ("left", "upper"), "lll": ("left", "lower")}
LOBES_ZH = {"上叶": ("", "upper"), "中叶": ("", "middle"), "下叶": ("", "lower"), "舌段": ("left", "lingula")}
# segments (value: the segment's English name, the lobe it lies in when the text gives none)
SEGMENTS_EN = {
    "apical segment": ("apical", "upper"), "posterior segment": ("posterior", ""), "anterior segment": ("anterior", ""),
    "apicoposterior segment": ("apicoposterior", "upper"), "superior segment": ("superior", "lower"),
    "lateral segment": ("lateral", "middle"), "medial segment": ("medial", "middle"),
    "superior lingular segment": ("superior lingular", "lingula"), "inferior lingular segment": ("inferior lingular", "lingula"),
    "anterior basal segment": ("anterior basal", "lower"), "lateral basal segment": ("lateral basal", "lower"),
    "posterior basal segment": ("posterior basal", "lower"), "medial basal segment": ("medial basal", "lower"),
    "basal segment": ("basal", "lower"), "basal segments": ("basal", "lower"),
}
SEGMENTS_ZH = {
    "尖段": ("apical", "upper"), "后段": ("posterior", ""), "前段": ("anterior", ""), "尖后段": ("apicoposterior", "upper"),
    "背段": ("superior", "lower"), "外侧段": ("lateral", "middle"), "内侧段": ("medial", "middle"),
    "上舌段": ("superior lingular", "lingula"), "下舌段": ("inferior lingular", "lingula"),
    "前基底段": ("anterior basal", "lower"), "外基底段": ("lateral basal", "lower"), "后基底段": ("posterior basal", "lower"),
    "内基底段": ("medial basal", "lower"), "基底段": ("basal", "lower"),
}
# zones of a radiograph's lung field (and the level words that imply one)
ZONES_EN = {"upper zone": "upper", "mid zone": "middle", "middle zone": "middle", "lower zone": "lower",
            "upper": "upper", "middle": "middle", "mid": "middle", "lower": "lower", "apex": "upper", "apical": "upper",
            "apices": "upper", "base": "lower", "bases": "lower", "basal": "lower", "basilar": "lower",
            "bibasilar": "lower", "bibasal": "lower", "upper lung": "upper", "lower lung": "lower",
            "costophrenic angle": "lower", "costophrenic angles": "lower"}
ZONES_ZH = {"上肺野": "upper", "中肺野": "middle", "下肺野": "lower", "上野": "upper", "中野": "middle", "下野": "lower",
            "上肺": "upper", "中肺": "middle", "下肺": "lower", "肺尖": "upper", "肺底": "lower", "双下肺": "lower",
            "两下肺": "lower", "肋膈角": "lower"}

# ConText (Harkema et al. 2009): triggers and the direction of their scope
NEGATED, POSSIBLE = "negated", "possible"
FORWARD, BACKWARD, BOTH = "forward", "backward", "both"
TRIGGERS_EN = {
    # negation
    "no": (NEGATED, FORWARD), "not": (NEGATED, FORWARD), "without": (NEGATED, FORWARD),
    "negative for": (NEGATED, FORWARD), "absence of": (NEGATED, FORWARD), "absent": (NEGATED, BACKWARD),
    "free of": (NEGATED, FORWARD), "no evidence of": (NEGATED, FORWARD), "no signs of": (NEGATED, FORWARD),
    "there is no": (NEGATED, FORWARD), "there are no": (NEGATED, FORWARD), "rules out": (NEGATED, FORWARD),
    "ruled out": (NEGATED, BACKWARD), "has been ruled out": (NEGATED, BACKWARD), "is excluded": (NEGATED, BACKWARD),
    "excluded": (NEGATED, BACKWARD), "not seen": (NEGATED, BACKWARD), "not identified": (NEGATED, BACKWARD),
    "not present": (NEGATED, BACKWARD), "not visualized": (NEGATED, BACKWARD), "not evident": (NEGATED, BACKWARD),
    "not demonstrated": (NEGATED, BACKWARD), "resolved": (NEGATED, BACKWARD), "has resolved": (NEGATED, BACKWARD),
    "no longer seen": (NEGATED, BACKWARD), "no longer": (NEGATED, FORWARD), "resolution of": (NEGATED, FORWARD),
    "interval resolution of": (NEGATED, FORWARD), "clearing of": (NEGATED, FORWARD),
    # uncertainty
    "possible": (POSSIBLE, FORWARD), "possibly": (POSSIBLE, FORWARD), "probable": (POSSIBLE, FORWARD),
    "probably": (POSSIBLE, FORWARD), "likely": (POSSIBLE, FORWARD), "may represent": (POSSIBLE, FORWARD),
    "may be": (POSSIBLE, FORWARD), "could represent": (POSSIBLE, FORWARD), "could be": (POSSIBLE, FORWARD),
    "suspicious for": (POSSIBLE, FORWARD), "suggestive of": (POSSIBLE, FORWARD), "suggesting": (POSSIBLE, FORWARD),
    "concerning for": (POSSIBLE, FORWARD), "concern for": (POSSIBLE, FORWARD), "questionable": (POSSIBLE, FORWARD),
    "equivocal": (POSSIBLE, FORWARD), "suspected": (POSSIBLE, BOTH), "cannot exclude": (POSSIBLE, FORWARD),
    "can not exclude": (POSSIBLE, FORWARD), "cannot rule out": (POSSIBLE, FORWARD), "differential includes": (POSSIBLE, FORWARD),
    "cannot be excluded": (POSSIBLE, BACKWARD), "can not be excluded": (POSSIBLE, BACKWARD),
    "cannot be ruled out": (POSSIBLE, BACKWARD), "not excluded": (POSSIBLE, BACKWARD), "is possible": (POSSIBLE, BACKWARD),
    "is not excluded": (POSSIBLE, BACKWARD), "versus": (POSSIBLE, BOTH),
}
TRIGGERS_ZH = {
    "未见": (NEGATED, FORWARD), "未见明显": (NEGATED, FORWARD), "未发现": (NEGATED, FORWARD), "无": (NEGATED, FORWARD),
    "无明显": (NEGATED, FORWARD), "没有": (NEGATED, FORWARD), "未": (NEGATED, FORWARD), "不伴": (NEGATED, FORWARD),
    "排除": (NEGATED, FORWARD), "除外": (NEGATED, FORWARD), "未显示": (NEGATED, FORWARD), "未探及": (NEGATED, FORWARD),
    "阴性": (NEGATED, BACKWARD), "消失": (NEGATED, BACKWARD), "已吸收": (NEGATED, BACKWARD), "不明显": (NEGATED, BACKWARD),
    "可能": (POSSIBLE, BOTH), "可能性大": (POSSIBLE, BACKWARD), "疑似": (POSSIBLE, FORWARD), "考虑": (POSSIBLE, FORWARD),
    "可疑": (POSSIBLE, FORWARD), "似见": (POSSIBLE, FORWARD), "倾向": (POSSIBLE, FORWARD), "怀疑": (POSSIBLE, FORWARD),
    "不除外": (POSSIBLE, BOTH), "不排除": (POSSIBLE, BOTH), "待排": (POSSIBLE, BACKWARD), "待排除": (POSSIBLE, BACKWARD),
    "待除外": (POSSIBLE, BACKWARD), "？": (POSSIBLE, BACKWARD),
}
# diagnoses: what a finding may be, never a finding (no place of their own to draw)
DIAGNOSES_EN = {"malignancy": "malignancy", "malignant": "malignancy", "cancer": "lung cancer", "carcinoma": "lung cancer",
                "neoplasm": "neoplasm", "metastasis": "metastasis", "metastases": "metastasis", "lymphoma": "lymphoma",
                "tuberculosis": "tuberculosis", "infection": "infection", "inflammation": "inflammation",
                "infectious": "infection", "inflammatory": "inflammation", "heart failure": "heart failure",
                "aspiration": "aspiration"}
DIAGNOSES_ZH = {"恶性": "malignancy", "恶性肿瘤": "malignancy", "肺癌": "lung cancer", "周围型肺癌": "lung cancer",
                "转移": "metastasis", "转移瘤": "metastasis", "淋巴瘤": "lymphoma", "结核": "tuberculosis",
                "肺结核": "tuberculosis", "感染": "infection", "感染性病变": "infection", "炎症": "inflammation",
                "炎性病变": "inflammation", "心衰": "heart failure", "心力衰竭": "heart failure",
                "病毒性肺炎": "viral pneumonia"}
# words that say what a finding before them in the sentence may be ("opacity, likely atelectasis"): the
# kind after them is that finding's interpretation, not a finding of its own
INTERPRETERS_EN = ("likely", "probably", "consistent with", "compatible with", "in keeping with", "may represent",
                   "could represent", "which may represent", "representing", "suggestive of", "suspicious for",
                   "concerning for", "concern for", "suggesting", "due to", "possibly")
INTERPRETERS_ZH = ("考虑", "提示", "符合", "可能为", "考虑为", "倾向", "多考虑")
# terms that look like triggers but are not ("no change": the finding is there, unchanged)
PSEUDO_EN = ("no change", "no significant change", "no interval change", "no appreciable change", "not only",
             "no increase", "without change", "without interval change", "not changed")
PSEUDO_ZH = ("无变化", "无明显变化", "未见变化", "未见明显变化", "较前无明显变化", "无明显改变", "未见明显改变", "无增大")
# terms that end a trigger's scope
TERMINATORS_EN = ("but", "however", "although", "though", "whereas", "which", "except", "apart from", "there is",
                  "there are", "otherwise", "aside from")
TERMINATORS_ZH = ("但", "但是", "然而", "另", "另见", "此外", "见", "可见", "示", "伴有", "而")
# a sentence about "it" names where an earlier finding is ("it is in the right upper zone.")
ANAPHORS_EN = ("it", "this", "this lesion", "the lesion", "the finding", "this finding", "the abnormality",
               "this abnormality")
ANAPHORS_ZH = ("它", "该病灶", "病灶位于", "这个异常", "该异常", "此异常")
