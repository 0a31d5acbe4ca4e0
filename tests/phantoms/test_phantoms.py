import numpy as np
import pytest

from monailabel_app.language.report import parse_report
from monailabel_app.phantoms.films import make_phantom


def test_same_seed_same_phantom():
    a, b = make_phantom(123), make_phantom(123)
    assert np.array_equal(a.image, b.image) and a.report == b.report
    assert [les.kind for les in a.lesions] == [les.kind for les in b.lesions]
    assert not np.array_equal(make_phantom(124).image, a.image)


@pytest.mark.parametrize("seed", range(60))
def test_lesions_sit_in_their_named_zone(seed):
    ph = make_phantom(seed)
    assert ph.image.dtype == np.uint8 and 0 <= len(ph.lesions) <= 2
    body_mid = (np.nonzero(ph.lungs["right"].any(0))[0].max() + np.nonzero(ph.lungs["left"].any(0))[0].min()) / 2
    for les in ph.lesions:
        assert les.mask.any() and les.mask.shape == ph.image.shape
        r, c = les.center
        # patient right is on the image's LEFT (low column index), as a PA radiograph is displayed
        assert (c < body_mid) == (les.side == "right")
        lung_rows = np.nonzero(ph.lungs[les.side].any(1))[0]
        third = (lung_rows.max() + 1 - lung_rows.min()) / 3
        level = ["upper", "middle", "lower"][min(2, int((r - lung_rows.min() + 0.5) // third))]
        if les.kind != "effusion":  # an effusion's meniscus may climb above its third
            assert level == les.level and les.mask[r, c]
        assert les.mask.sum() <= (les.mask & ph.lungs[les.side]).sum()  # inside the lung
        # the lesion is visible: brighter than the rest of its lung
        assert ph.image[les.mask].mean() > ph.image[ph.lungs[les.side] & ~les.mask].mean() + 20
    assert [(f.kind, f.side, f.level) for f in parse_report(ph.report)] == [
        (les.kind, les.side, les.level) for les in ph.lesions
    ]


def test_effusion_only_in_lower_zones_and_mix_of_counts():
    counts, kinds = set(), set()
    for seed in range(300):
        ph = make_phantom(seed)
        counts.add(len(ph.lesions))
        for les in ph.lesions:
            kinds.add(les.kind)
            if les.kind == "effusion":
                assert les.level == "lower"
    assert counts == {0, 1, 2} and kinds == {"opacity", "nodule", "effusion"}
