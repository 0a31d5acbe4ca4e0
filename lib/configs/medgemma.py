"""MONAI Label task config ``medgemma``: which model, on which device, in which precision.

``--conf`` keys (all optional):

* ``model``: Hugging Face id or local folder (default: the embedded phantom model, a TEST model that
  is NOT MedGemma); ``device``: auto, cpu, cuda[:N]; ``precision``: auto, bf16, fp32, fp16;
* ``question``: the default question; ``max_new_tokens``: the default answer length limit.
"""

from __future__ import annotations


from monailabel.interfaces.config import TaskConfig

from lib.infers.medgemma import MedGemmaInfer
from monailabel_app.phantom_model import DEFAULT_QUESTION
from monailabel_app.reader import Reader


class MedGemma(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.reader = Reader(
            conf.get("model") or None,
            device=conf.get("device", "auto"),
            precision=conf.get("precision", "auto"),
        )
        self.default_question = conf.get("question", DEFAULT_QUESTION)
        self.max_new_tokens = int(conf.get("max_new_tokens", 128))

    def infer(self):
        info = self.reader.info
        label = f" [{info.label}]" if info.label else ""
        return MedGemmaInfer(
            self.reader,
            description=f"Findings text and one attention mask per finding from {info.id}{label}",
            config={
                "question": self.default_question,
                "max_new_tokens": self.max_new_tokens,
                "precision": info.precision,
                "device": info.device,
                "model": info.id,
            },
        )

    def trainer(self):
        return None
