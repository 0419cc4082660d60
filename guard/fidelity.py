"""Does an image answer its prompt? The CLIP test a REROUTED image must pass (one definition, used by
`memguard calibrate` and the pipeline's final check).

A raw CLIP cosine says little on its own: its scale depends on the CLIP model and on the prompt
(on the ε-testbed the benign generations' 5th percentile was 0.008, under most reroutes that had
lost their prompt). So the prompt competes with reference captions, the benign calibration prompts:

    z = (cos(image, prompt) − mean_j cos(image, ref_j)) / std_j cos(image, ref_j)

the prompt's standing among other things the model is asked for (references equal to the prompt are
left out). An image that answers its prompt scores its prompt above most references; a reroute of a
caption that means nothing to the model but the memorized photo does not. Calibration stores the
benign z's low quantile as `Policy.reroute_min_fidelity`, the references as `Policy.reroute_references`.
"""
from __future__ import annotations

import numpy as np

from memguard.errors import InvalidInput

MAX_REFERENCES = 256   # enough for a stable mean and std; a policy file stays small
MIN_REFERENCES = 8     # fewer give no usable std


def reference_prompts(prompts: list[str], limit: int = MAX_REFERENCES) -> list[str]:
    """Distinct prompts in first-seen order, at most `limit`."""
    return list(dict.fromkeys(prompts))[:limit]


class PromptFidelity:
    """An index CLIP encoder (image and text towers) with the reference captions' embeddings."""

    def __init__(self, encoder, references: list[str]):
        if len(references) < MIN_REFERENCES:
            raise InvalidInput("reroute_references", f"{len(references)} reference prompts; at least "
                                                     f"{MIN_REFERENCES} are needed")
        self.encoder, self.references = encoder, list(references)
        self._refs = encoder.encode_text(self.references)          # [R, D] unit rows

    def zscores(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        """Paired images and prompts → [N] float64: the prompt's CLIP standing among the references."""
        if len(images) != len(prompts):
            raise InvalidInput("prompts", f"got {len(prompts)} prompts for {len(images)} images; they are paired")
        if not images:
            return np.zeros(0)
        img = self.encoder.encode(images)                           # [N, D]
        own = (img * self.encoder.encode_text(list(prompts))).sum(1).astype(np.float64)
        others = (img @ self._refs.T).astype(np.float64)            # [N, R]
        keep = np.array([[r != p for r in self.references] for p in prompts])
        mean = (others * keep).sum(1) / keep.sum(1)
        var = (((others - mean[:, None]) ** 2) * keep).sum(1) / np.maximum(keep.sum(1) - 1, 1)
        return (own - mean) / np.sqrt(np.maximum(var, 1e-12))
