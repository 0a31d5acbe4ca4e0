"""Which tokens of a finding look at its lesion, per layer, asked in English and in Chinese.

    .venv/bin/python bench/attention_by_token.py [--seeds 0:60] [--model DIR] [--out bench/results/attention_by_token.md]

For each lesion of held-out radiograph phantoms whose zone the model named, each token of the finding's
words and each recorded layer (rolled out as the maps are) gives a map on its own; the table is the share of
lesions that map's maximum points at (within half a token cell), by the token's place in the finding. It
shows where the grounding of a language comes from: the maps average these tokens (:func:`study_maps.finding_grid`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from monailabel_app.grounding import maps  # noqa: E402
from monailabel_app.grounding.study_maps import LANGUAGE_ENTRIES, finding_grid  # noqa: E402
from monailabel_app.io.xray import Geometry, Radiograph  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402
from monailabel_app.reader import Reader  # noqa: E402


def table(reader: Reader, seeds, language: str) -> tuple[list[str], int]:
    layers = list(range(reader.model.config.text_config.num_hidden_layers))
    reader.info.grounding.update(layers=layers)
    for lang in LANGUAGE_ENTRIES:  # every layer recorded and kept, whatever the answer's language
        reader.info.grounding.pop(lang, None)
    hits, words = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    lesions = 0
    for seed in seeds:
        ph = make_phantom(seed)
        rd = reader.read(Radiograph(ph.image, Geometry.plain(*ph.image.shape)), language=language)
        gen, tol = rd.generation, rd.pad.side / reader.grid / 2
        for les in ph.lesions:
            k = next((i for i, f in enumerate(rd.findings) if (f.side, f.level) == (les.side, les.level)), None)
            if k is None:
                continue
            lesions += 1
            dist = ndimage.distance_transform_edt(~les.mask)
            for place, row in enumerate(gen.token_range(rd.findings[k].span)):
                start = gen.token_ends[row - 1] if row else 0
                words[place][gen.text[start:gen.token_ends[row]].strip()] += 1
                for li, layer in enumerate(gen.layers):
                    one = dataclasses.replace(gen, attention=gen.attention[:, [li]], layers=[layer])
                    h = maps.grid_to_pixels(finding_grid(one, [row], reader.grid), rd.pad).reshape(ph.image.shape)
                    p = np.unravel_index(int(np.argmax(h)), h.shape)
                    hits[(place, layer)].append(dist[p] <= tol)
    lines = ["| token's place | tokens there | " + " | ".join(f"layer {x}" for x in layers) + " |",
             "|---|---|" + "---|" * len(layers)]
    for place in sorted(words):
        common = ", ".join(w for w, _ in words[place].most_common(3))
        lines.append(f"| {place + 1} | {common} | " + " | ".join(f"{np.mean(hits[(place, x)]):.2f}" for x in layers) + " |")
    return lines, lesions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:60")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "attention_by_token.md"))
    args = ap.parse_args(argv)
    a, b = (int(x) for x in args.seeds.split(":"))
    reader = Reader(args.model, precision="fp32")
    saved = dict(reader.info.grounding)
    out = [f"# Pointing of each finding token's attention, by layer ({time.strftime('%Y-%m-%d')}, fp32, "
           f"{reader.info.label or reader.model_ref}, radiograph phantoms {a}..{b - 1}, "
           f"attention {'rolled out' if saved.get('rollout') else 'direct'})", ""]
    for language in ("en", "zh"):
        lines, lesions = table(reader, range(a, b), language)
        out += [f"## Asked in {'English' if language == 'en' else 'Chinese'} ({lesions} lesions named)", "", *lines, ""]
    reader.info.grounding.clear()
    reader.info.grounding.update(saved)
    text = "\n".join(out)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
