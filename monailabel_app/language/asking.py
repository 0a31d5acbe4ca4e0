"""The language of the answer: asked for (``zh``, ``en``) or taken from the question's script (``auto``).

A question is put to the model in its own words, with an instruction added where the answer should be in
another language than the question's (and always for Chinese, since MedGemma answers Chinese questions in
mixed Chinese and English at times): "请用中文回答。" / "Please answer in English.".
"""

from __future__ import annotations

from ..errors import InputError
from .findings import detect_language

LANGUAGES = ("auto", "zh", "en")
ANSWER_IN = {"zh": "请用中文回答。", "en": "Please answer in English."}


def check_language(value) -> str:
    """``auto``, ``zh`` or ``en`` (``None``: auto); else InputError saying what is allowed."""
    if value is None:
        return "auto"
    if not isinstance(value, str) or value.strip().lower() not in LANGUAGES:
        raise InputError(f"'language' must be one of {', '.join(LANGUAGES)}, got {value!r}")
    return value.strip().lower()


def answer_language(question: str, language: str = "auto") -> str:
    """The language the answer is asked in: ``language``, or the question's script when ``auto``."""
    language = check_language(language)
    return detect_language(question) if language == "auto" else language


def ask_in(question: str, language: str) -> str:
    """``question`` as put to the model for an answer in ``language`` (``zh`` / ``en``)."""
    if language == "zh" and "中文" not in question:
        return f"{question} {ANSWER_IN['zh']}"
    if language == "en" and detect_language(question) == "zh":
        return f"{question} {ANSWER_IN['en']}"
    return question
