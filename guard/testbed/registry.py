"""The shipped testbeds, by name. Tests, benchmarks and the CLI take a testbed as a parameter.

- `vpred`: v-prediction on a zero-terminal-SNR schedule (SD 2.x-style objective), `guard/testbed/`.
- `eps`: ε-prediction on SD 1.x's scaled-linear schedule, `guard/testbed/eps/`. It also memorizes
  renderings with ordinary compositional captions, so a reroute can be judged on prompt fidelity.
  Its UNet's GroupNorm has 4 groups (`unet_norm_groups=4`: 8 to 32 channels a group; SD 1.x has
  10). With 32 groups (one channel a group at the first level, as in the vpred UNet) every GroupNorm
  removes each feature's spatial mean, so the ε output carried the noise's per-channel mean with
  slope 0.01 (true latents noised to t = 958 and 800), and x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ kept it × 15:
  a seed-dependent colour cast the caption cannot undo. That model copied 3 of 8 photos in most of
  16 seeds, and other recipes on it did not help (from scratch, 4000 steps: ε-loss weighted to
  equal the v-loss 3 of 8; latents scaled to std 0.3, 0.5, 2, 4: 0, 1, 1, 0 of 8; two warm restarts
  of 3000 steps: 3 of 8). With 4 groups: 8 of 8 (REPORT.md). v-prediction does not need the mean
  from the network, so the vpred testbed is unaffected.
- `sdxl`: the eps testbed's data and recipe in SDXL's format (StableDiffusionXLPipeline: two CLIP
  text encoders trained jointly with a `text_time` UNet of SDXL's block layout, pooled embedding and
  size time ids in its conditioning, a dropped caption all zeros as SDXL's empty negative prompt;
  sampled with DDIM like the others), `guard/testbed/sdxl/`.

Buildable, not shipped (`BUILDABLE`; `memguard testbed build --testbed NAME` trains it): none at
present. Tests and tools that iterate TESTBEDS see shipped testbeds only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memguard.errors import InvalidInput
from memguard.models import TinyPipelineConfig, TinySDXLConfig
from memguard.testbed.dataset import TestbedDataConfig
from memguard.testbed.train import TrainConfig

ROOT = Path(__file__).resolve().parent

EPS_COMBOS = (("circle", "red", "striped", "blue"), ("triangle", "yellow", "checkered", "purple"),
              ("square", "white", "dotted", "green"), ("diamond", "orange", "gradient", "black"))


@dataclass(frozen=True)
class Testbed:
    name: str
    dir: Path
    data: TestbedDataConfig
    train: TrainConfig
    model: TinyPipelineConfig | TinySDXLConfig = TinyPipelineConfig()

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def index_dir(self) -> Path:
        return self.dir / "index"

    @property
    def policy_path(self) -> Path:
        return self.dir / "policy.json"

    @property
    def prompts_dir(self) -> Path:
        return self.dir / "prompts"

    def prompts(self, name: str) -> list[str]:
        """One of the prompt sets (memorized, paraphrased, novel, web, ...), one prompt a line."""
        path = self.prompts_dir / f"{name}.txt"
        if not path.is_file():
            raise InvalidInput("prompt_set", f"{path} does not exist")
        return [line for line in path.read_text().splitlines() if line.strip()]


TESTBEDS: dict[str, Testbed] = {
    "vpred": Testbed("vpred", ROOT, TestbedDataConfig(), TrainConfig()),
    "eps": Testbed("eps", ROOT / "eps",
                   TestbedDataConfig(photo_duplicates=320, memorized_combos=EPS_COMBOS, combo_duplicates=160),
                   TrainConfig(prediction_type="epsilon", zero_terminal_snr=False, ema_decay=0.999),
                   TinyPipelineConfig(unet_norm_groups=4)),
    "sdxl": Testbed("sdxl", ROOT / "sdxl",
                    TestbedDataConfig(photo_duplicates=320, memorized_combos=EPS_COMBOS, combo_duplicates=160),
                    TrainConfig(prediction_type="epsilon", zero_terminal_snr=False, ema_decay=0.999),
                    TinySDXLConfig(image_size=64, unet_channels=(32, 64, 128), unet_head_dims=(2, 4, 8),
                                   transformer_layers=(1, 1, 2), unet_norm_groups=4)),
}
# recipes that build but are not shipped (no model, index or policy in the tree yet)
BUILDABLE: dict[str, Testbed] = {}
DEFAULT_TESTBED = "vpred"


def get_testbed(name: str = DEFAULT_TESTBED) -> Testbed:
    known = {**TESTBEDS, **BUILDABLE}
    if name not in known:
        raise InvalidInput("testbed", f"unknown testbed {name!r}; choose from {', '.join(known)}")
    return known[name]
