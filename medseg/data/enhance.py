"""Simulated contrast enhancement, the ``enhance`` augmentation (see :mod:`medseg.data.augment`)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform


class RandContrastPhased(RandomizableTransform, MapTransform):
    """Simulated contrast enhancement (see the module's docstring) on an image already mapped from HU
    by ``hu_map`` = (HU low, HU high, value low, value high), clipped at both ends (as
    :func:`medseg.data.transforms.intensity_map`); the result is clipped to the same range, so
    training never sees a value inference cannot produce."""

    ORGAN_HU = (0.0, 150.0)
    TISSUE_HU = (0.0, 50.0)
    FADE_HU = ((-100.0, -30.0), (150.0, 250.0))  # weight 0 -> 1 over fat, 1 -> 0 towards bone

    def __init__(self, prob: float, classes: int, hu_map: tuple[float, float, float, float]) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, ["image", "label"])
        self.classes = classes
        self.hu_map = hu_map
        self.offsets = np.zeros(classes + 1)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.offsets = np.concatenate([[self.R.uniform(*self.TISSUE_HU)], self.R.uniform(*self.ORGAN_HU, self.classes)])

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        lo, hi, a, b = self.hu_map
        x, y = d["image"], d["label"]
        hu = lo + (x - a) * ((hi - lo) / (b - a))
        (f0, f1), (b0, b1) = self.FADE_HU
        weight = torch.clamp((hu - f0) / (f1 - f0), 0, 1) * torch.clamp((b1 - hu) / (b1 - b0), 0, 1)
        # at the clip's floor the true value is unknown (air or fat when the clip starts above -100 HU): untouched
        weight = torch.where(hu <= lo + 1e-3 * (hi - lo), torch.zeros_like(weight), weight)
        # per class value: the tissue offset, plus the class's own for a labelled class
        table = torch.as_tensor(self.offsets, dtype=x.dtype, device=x.device).clone()
        table[1:] += table[0]
        shift = table[torch.as_tensor(y, device=x.device).round().long().clamp(0, self.classes)]
        out = a + (hu + weight * shift - lo) * ((b - a) / (hi - lo))
        d["image"] = torch.clamp(out, min(a, b), max(a, b)).to(x.dtype)
        return d
