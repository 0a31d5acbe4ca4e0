"""``medgemma-label``: read a radiograph from the command line, or draw phantoms.

    medgemma-label -i IMAGE -o OUTDIR [--model ID|DIR] [--question TEXT] [--precision auto|bf16|fp32|fp16]
                   [--device auto|cpu|cuda] [--max-new-tokens N] [--save-inputs]
    medgemma-label phantom --seed N [--count K] --out DIR

Without ``--model`` the embedded phantom model is used: a tiny synthetic TEST model, not MedGemma.
Exit status: 0 done, 2 bad input (the message says what was wrong), 3 the model could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
from PIL import Image


def _phantom_main(argv) -> int:
    from .phantoms import make_phantom

    ap = argparse.ArgumentParser(prog="medgemma-label phantom", description="Draw synthetic chest X-ray phantoms.")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--count", type=int, default=1, help="draw seeds seed..seed+count-1")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for seed in range(args.seed, args.seed + args.count):
        ph = make_phantom(seed)
        stem = os.path.join(args.out, f"phantom_{seed:06d}")
        Image.fromarray(ph.image).save(stem + ".png")
        labels = np.zeros(ph.image.shape, np.uint8)
        for k, les in enumerate(ph.lesions, start=1):
            labels[les.mask] = k
        Image.fromarray(labels).save(stem + "_mask.png")
        meta = {
            "seed": seed,
            "report": ph.report,
            "lesions": [
                {"label": k, "kind": les.kind, "side": les.side, "level": les.level, "pixels": int(les.mask.sum())}
                for k, les in enumerate(ph.lesions, start=1)
            ],
            "note": "synthetic phantom; patient right is on the image left",
        }
        with open(stem + ".json", "w") as f:
            json.dump(meta, f, indent=2)
        print(f"{stem}.png  {ph.report}")
    return 0


def _read_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="medgemma-label", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", required=True, help="radiograph: PNG/JPEG, DICOM CR/DX, or a 2-D NIfTI/NRRD")
    ap.add_argument("-o", "--out", required=True, help="output folder")
    ap.add_argument("--model", default=None, help="Hugging Face id or local folder (default: embedded phantom model)")
    ap.add_argument("--question", default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--save-inputs", action="store_true", help="write the exact model input images to OUT/inputs/")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from .errors import InputError
    from .loading import ModelLoadError
    from .reader import Reader
    from .writers import write_reading

    try:
        reader = Reader(args.model, device=args.device, precision=args.precision)
        reading = reader.read(args.input, args.question, args.max_new_tokens)
        result = write_reading(reading, args.out, save_model_inputs=args.save_inputs)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"model: {reading.model['id']} ({reading.model['precision']} on {reading.model['device']})"
          + (f" [{reading.model['label']}]" if reading.model.get("label") else ""))
    print(f"report: {reading.report}")
    for f in result["findings"]:
        print(f"  {f['label']}: {f['name']}  (score {f['score']:.2f})")
    print(f"wrote {', '.join(result['files'].values())} in {args.out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "phantom":
        return _phantom_main(argv[1:])
    return _read_main(argv)


if __name__ == "__main__":
    sys.exit(main())
