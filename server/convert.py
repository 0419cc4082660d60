"""protobuf ⇄ guard types, both directions (the server uses one, the client the other).

Membership information is copied into a message only when the caller says `audit=True` (the
servicer decides that from the caller's scopes): GuardReport.audit / ScreenOutcome.audit, and every
continuous value (GuardReport.scores, first_flagged_step, StepProgress.signals, the step numbers in
mitigations). Without it a caller sees decisions, coarse reasons and coarse progress only.

Uploads are decoded under `UploadConfig`: PNG, JPEG or WebP only, pixel cap, minimum side and
aspect-ratio bound checked from the header before any pixel is decoded.
"""
from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format, struct_pb2

from memguard.engine import IndexStats, ScreenOutcome
from memguard.errors import InvalidInput
from memguard.types import (Decision, FaceAction, GenerationRequest, GuardMode, GuardReport, ImageResult, Reason,
                         RequestLimits, StepEvent)
from memguard.proto.memguard.v1 import admin_pb2, memguard_pb2 as pb
from memguard.index import decode as _decode
from memguard.index.decode import MAX_FRAMES
from memguard.server.config import UploadConfig

MAX_UPLOAD_PIXELS = UploadConfig().max_pixels   # decoded size cap for uploads: no decompression bombs
MAX_REQUEST_ID_CHARS = 128
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]+")     # printable ASCII, no spaces or control characters
_STEP_PREFIX = re.compile(r"^step \d+: ")

MODES = {pb.GUARD_MODE_ENFORCE: GuardMode.ENFORCE, pb.GUARD_MODE_MONITOR: GuardMode.MONITOR,
         pb.GUARD_MODE_OFF: GuardMode.OFF}
FACE_ACTIONS = {pb.FACE_ACTION_BLUR: FaceAction.BLUR, pb.FACE_ACTION_PIXELATE: FaceAction.PIXELATE,
                pb.FACE_ACTION_BLOCK: FaceAction.BLOCK}
DECISIONS = {Decision.ALLOWED: pb.DECISION_ALLOWED, Decision.REROUTED: pb.DECISION_REROUTED,
             Decision.FACE_OBFUSCATED: pb.DECISION_FACE_OBFUSCATED, Decision.BLOCKED: pb.DECISION_BLOCKED}
REASONS = {Reason.NONE: pb.REASON_NONE, Reason.MEMORIZATION: pb.REASON_MEMORIZATION,
           Reason.PROTECTED_FACE: pb.REASON_PROTECTED_FACE, Reason.SCREENING_FAILED: pb.REASON_SCREENING_FAILED,
           Reason.CANCELLED: pb.REASON_CANCELLED}
MODE_TO_PB = {v: k for k, v in MODES.items()}
FACE_TO_PB = {v: k for k, v in FACE_ACTIONS.items()}
DECISION_FROM_PB = {v: k for k, v in DECISIONS.items()}
REASON_FROM_PB = {v: k for k, v in REASONS.items()}


@dataclass(frozen=True)
class RequestDefaults:
    size: int = 64
    steps: int = 30
    mode: GuardMode = GuardMode.ENFORCE
    face_action: FaceAction = FaceAction.BLUR


# ----------------------------------------------------------------------------- images
def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# the viewer-faithful decoder lives in the library (memguard.index.decode); the server's names stay
def check_image_header(width: int, height: int, field: str, limits: UploadConfig) -> None:
    """Bound the work an upload can cause before decoding it: pixels, minimum side, aspect ratio."""
    _decode.check_image_header(width, height, field, limits)


def decode_views(data: bytes, field: str, limits: UploadConfig = UploadConfig(), *,
                 multi_frame: bool = True, max_frames: int = MAX_FRAMES) -> list[np.ndarray]:
    """Upload bytes → every view a viewer can be shown (memguard.index.decode.decode_views)."""
    return _decode.decode_views(data, field, limits, multi_frame=multi_frame, max_frames=max_frames)


def decode_image(data: bytes, field: str, limits: UploadConfig = UploadConfig()) -> np.ndarray:
    """One still image as a viewer shows it; a multi-frame image is refused (Protect registers exactly
    what it was shown; a multi-picture JPEG gives its primary picture)."""
    return _decode.decode_image(data, field, limits)


def merge_outcomes(outcomes: list[ScreenOutcome]) -> ScreenOutcome:
    """One verdict for several views of an upload: a copy or a matched face in any view counts."""
    if len(outcomes) == 1:
        return outcomes[0]
    copy = any(o.copy_detected for o in outcomes)
    matched = max(o.faces_matched for o in outcomes)
    reason = Reason.MEMORIZATION if copy else Reason.PROTECTED_FACE if matched else Reason.NONE
    worst = next((o for o in outcomes if o.copy_detected), None) or max(outcomes, key=lambda o: o.faces_matched)
    audit = dict(worst.audit) if isinstance(worst.audit, dict) else {}
    audit["faces"] = [f for o in outcomes if isinstance(o.audit, dict) for f in (o.audit.get("faces") or [])]
    audit["views"] = [{"copy_detected": o.copy_detected, "faces_matched": o.faces_matched,
                       "faces_protected": protected_faces(o)} for o in outcomes]
    return ScreenOutcome(copy_detected=copy, faces_detected=max(o.faces_detected for o in outcomes),
                         faces_matched=matched, reason=reason, audit=audit)


def screen_upload(engine, data: bytes, field: str, limits: UploadConfig = UploadConfig()) -> ScreenOutcome:
    """Screen every view of an upload (frames; transparency over white and black); one merged verdict."""
    return merge_outcomes([engine.screen(view) for view in decode_views(data, field, limits)])


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """≤ 128 printable ASCII characters (it is echoed in every event and written to the audit log)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(field, f"{len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if request_id and not _PRINTABLE_ID.fullmatch(request_id):
        raise InvalidInput(field, "only printable ASCII characters without spaces are allowed")
    return request_id


# ----------------------------------------------------------------------------- server direction
def generation_request(msg: pb.GenerateRequest, defaults: RequestDefaults, limits: RequestLimits) -> GenerationRequest:
    """Message → validated GenerationRequest; zero/unset fields take the server's defaults."""
    if msg.mode not in MODES and msg.mode != pb.GUARD_MODE_UNSPECIFIED:
        raise InvalidInput("mode", f"unknown guard mode {msg.mode}")
    if msg.face_action not in FACE_ACTIONS and msg.face_action != pb.FACE_ACTION_UNSPECIFIED:
        raise InvalidInput("face_action", f"unknown face action {msg.face_action}")
    request = GenerationRequest(
        prompt=msg.prompt, negative_prompt=msg.negative_prompt,
        height=msg.height or defaults.size, width=msg.width or defaults.size,
        steps=msg.steps or defaults.steps,
        seed=msg.seed if msg.HasField("seed") else None,
        num_images=msg.num_images or 1,
        mode=MODES.get(msg.mode, defaults.mode),
        face_action=FACE_ACTIONS.get(msg.face_action, defaults.face_action),
        request_id=check_request_id(msg.request_id) or uuid.uuid4().hex)
    if msg.HasField("guidance_scale"):
        request.guidance_scale = msg.guidance_scale
    request.validate(limits)
    return request


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def to_struct(data: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(data, default=_jsonable)))
    return struct


def coarse_mitigations(mitigations: list[str]) -> list[str]:
    """Mitigation names without the step they started at (the step hints at the similarity)."""
    return list(dict.fromkeys(_STEP_PREFIX.sub("", m) for m in mitigations))


def report_message(report: GuardReport, audit: bool) -> pb.GuardReport:
    if not audit:
        return pb.GuardReport(steps_computed=report.steps_computed,
                              mitigations=coarse_mitigations(report.mitigations))
    msg = pb.GuardReport(scores={k: float(v) for k, v in report.scores.items()},
                         steps_computed=report.steps_computed, mitigations=report.mitigations)
    if report.first_flagged_step is not None:
        msg.first_flagged_step = report.first_flagged_step
    if report.audit:
        msg.audit.CopyFrom(to_struct(report.audit))
    return msg


def image_message(result: ImageResult, audit: bool) -> pb.GeneratedImage:
    return pb.GeneratedImage(
        index=result.index, seed=result.seed, decision=DECISIONS[result.decision], reason=REASONS[result.reason],
        png=encode_png(result.image) if result.image is not None else b"",
        report=report_message(result.report, audit))


def generate_response(request: GenerationRequest, results: list[ImageResult], effective_mode: GuardMode,
                      audit: bool) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=request.request_id, effective_mode=MODE_TO_PB[effective_mode],
                               images=[image_message(r, audit) for r in results])


def progress_message(event: StepEvent, audit: bool) -> pb.StepProgress:
    """Coarse progress (step, total, action) for everyone; the per-step signals for audit only."""
    return pb.StepProgress(request_id=event.request_id, image_index=event.image_index, step=event.step,
                           total_steps=event.total_steps, action=event.action,
                           signals={k: float(v) for k, v in event.signals.items()} if audit else {})


def protected_faces(outcome: ScreenOutcome) -> int:
    """Matched faces of protected identities only (from the index's per-face detail; for several views
    of one upload, the most any view has)."""
    audit = outcome.audit if isinstance(outcome.audit, dict) else {}
    views = audit.get("views")
    if isinstance(views, list) and views and all(isinstance(v, dict) and "faces_protected" in v for v in views):
        return max(int(v["faces_protected"]) for v in views)
    faces = audit.get("faces")
    if not isinstance(faces, list):
        return 0
    return sum(1 for f in faces if isinstance(f, dict) and f.get("matched") and f.get("protected"))


def screen_response(outcome: ScreenOutcome, request_id: str, audit: bool,
                    face_match_scope: str = "protected") -> pb.ScreenResponse:
    matched = outcome.faces_matched if face_match_scope == "any" else protected_faces(outcome)
    reason = outcome.reason
    if reason is Reason.PROTECTED_FACE and not matched:
        reason = Reason.NONE
    msg = pb.ScreenResponse(request_id=request_id, copy_detected=outcome.copy_detected,
                            faces_detected=outcome.faces_detected, faces_matched=matched,
                            reason=REASONS[reason])
    if audit and outcome.audit:
        msg.audit.CopyFrom(to_struct(outcome.audit))
    return msg


def index_stats_message(stats: IndexStats) -> admin_pb2.IndexStats:
    return admin_pb2.IndexStats(items=stats.items, protected_items=stats.protected_items,
                                details={k: float(v) for k, v in stats.details.items()})


# ----------------------------------------------------------------------------- client direction
def request_message(request: GenerationRequest) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(prompt=request.prompt, negative_prompt=request.negative_prompt,
                             height=request.height, width=request.width, steps=request.steps,
                             guidance_scale=request.guidance_scale, num_images=request.num_images,
                             mode=MODE_TO_PB[request.mode], face_action=FACE_TO_PB[request.face_action],
                             request_id=request.request_id)
    if request.seed is not None:
        msg.seed = request.seed
    return msg


def image_result(msg: pb.GeneratedImage) -> ImageResult:
    report = GuardReport(scores=dict(msg.report.scores), steps_computed=msg.report.steps_computed,
                         mitigations=list(msg.report.mitigations),
                         first_flagged_step=(msg.report.first_flagged_step
                                             if msg.report.HasField("first_flagged_step") else None),
                         audit=json_format.MessageToDict(msg.report.audit) if msg.report.HasField("audit") else {})
    return ImageResult(index=msg.index, seed=msg.seed, decision=DECISION_FROM_PB[msg.decision],
                       reason=REASON_FROM_PB[msg.reason], report=report,
                       image=decode_image(msg.png, "png") if msg.png else None)
