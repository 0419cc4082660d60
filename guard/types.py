"""Plain data types shared by the guard and its callers (CLI, server). No torch, no I/O.

The server converts protobuf ⇄ these types; the engine consumes requests and emits results,
step events and stats. Fields that reveal which training item matched (membership information)
live only in `GuardReport.audit` and are released to audit-scoped callers alone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from memguard.errors import InvalidInput


class GuardMode(str, enum.Enum):
    ENFORCE = "enforce"   # reroute or block
    MONITOR = "monitor"   # score and report, change nothing
    OFF = "off"           # plain generation


class FaceAction(str, enum.Enum):
    BLUR = "blur"
    PIXELATE = "pixelate"
    BLOCK = "block"


class Decision(str, enum.Enum):
    ALLOWED = "ALLOWED"
    REROUTED = "REROUTED"
    FACE_OBFUSCATED = "FACE_OBFUSCATED"
    BLOCKED = "BLOCKED"


class Reason(str, enum.Enum):
    NONE = "NONE"
    MEMORIZATION = "MEMORIZATION"
    PROTECTED_FACE = "PROTECTED_FACE"
    SCREENING_FAILED = "SCREENING_FAILED"   # fail closed: could not screen, nothing released
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_chars: int = 2000
    max_steps: int = 150
    max_images: int = 8
    sizes: tuple[int, ...] = (64, 128, 256, 512, 768, 1024)
    max_guidance: float = 30.0


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    height: int = 64
    width: int = 64
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int | None = None
    num_images: int = 1
    mode: GuardMode = GuardMode.ENFORCE
    face_action: FaceAction = FaceAction.BLUR
    request_id: str = ""

    def validate(self, limits: RequestLimits = RequestLimits()) -> None:
        """Raise InvalidInput naming the first bad field."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidInput("prompt", "must be a non-empty string")
        if len(self.prompt) > limits.max_prompt_chars:
            raise InvalidInput("prompt", f"longer than {limits.max_prompt_chars} characters")
        if len(self.negative_prompt) > limits.max_prompt_chars:
            raise InvalidInput("negative_prompt", f"longer than {limits.max_prompt_chars} characters")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value not in limits.sizes:
                raise InvalidInput(name, f"{value} is not one of {list(limits.sizes)}")
        if not 1 <= self.steps <= limits.max_steps:
            raise InvalidInput("steps", f"{self.steps} is outside 1..{limits.max_steps}")
        if not 0.0 <= self.guidance_scale <= limits.max_guidance:
            raise InvalidInput("guidance_scale", f"{self.guidance_scale} is outside 0..{limits.max_guidance}")
        if not 1 <= self.num_images <= limits.max_images:
            raise InvalidInput("num_images", f"{self.num_images} is outside 1..{limits.max_images}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidInput("seed", f"{self.seed} is outside 0..2^63-1")
        if not isinstance(self.mode, GuardMode):
            raise InvalidInput("mode", f"{self.mode!r} is not one of {[m.value for m in GuardMode]}")
        if not isinstance(self.face_action, FaceAction):
            raise InvalidInput("face_action", f"{self.face_action!r} is not one of {[a.value for a in FaceAction]}")


@dataclass
class StepEvent:
    """Progress of one image at one denoising step, with a compact signal summary."""
    request_id: str
    image_index: int
    step: int                 # 0-based
    total_steps: int
    signals: dict[str, float] = field(default_factory=dict)
    action: str = "continue"  # continue | reroute | block


@dataclass
class GuardReport:
    scores: dict[str, float] = field(default_factory=dict)
    first_flagged_step: int | None = None
    steps_computed: int = 0
    mitigations: list[str] = field(default_factory=list)
    trace: list[dict[str, float]] = field(default_factory=list)  # per step: signal → value
    audit: dict[str, object] = field(default_factory=dict)       # matched item ids and scores: audit scope only


@dataclass
class ImageResult:
    index: int
    seed: int
    decision: Decision
    reason: Reason = Reason.NONE
    image: np.ndarray | None = None   # uint8 [H, W, 3]; None when blocked
    report: GuardReport = field(default_factory=GuardReport)
