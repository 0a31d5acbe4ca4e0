from .medgemma import MedGemmaInfer

__all__ = ["MedGemmaInfer"]
