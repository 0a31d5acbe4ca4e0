"""The MedGemma module's logic that needs neither Qt nor MRML (tested outside Slicer)."""

from .client import Cancelled, Finding, InferJob, MedGemmaClient, ReadingResult, ServerError, StudyConversation

__all__ = ["Cancelled", "Finding", "InferJob", "MedGemmaClient", "ReadingResult", "ServerError", "StudyConversation"]
