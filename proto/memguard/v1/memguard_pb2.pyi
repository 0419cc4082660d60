from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GuardMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARD_MODE_UNSPECIFIED: _ClassVar[GuardMode]
    GUARD_MODE_ENFORCE: _ClassVar[GuardMode]
    GUARD_MODE_MONITOR: _ClassVar[GuardMode]
    GUARD_MODE_OFF: _ClassVar[GuardMode]

class FaceAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_ACTION_UNSPECIFIED: _ClassVar[FaceAction]
    FACE_ACTION_BLUR: _ClassVar[FaceAction]
    FACE_ACTION_PIXELATE: _ClassVar[FaceAction]
    FACE_ACTION_BLOCK: _ClassVar[FaceAction]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOWED: _ClassVar[Decision]
    DECISION_REROUTED: _ClassVar[Decision]
    DECISION_FACE_OBFUSCATED: _ClassVar[Decision]
    DECISION_BLOCKED: _ClassVar[Decision]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_NONE: _ClassVar[Reason]
    REASON_MEMORIZATION: _ClassVar[Reason]
    REASON_PROTECTED_FACE: _ClassVar[Reason]
    REASON_SCREENING_FAILED: _ClassVar[Reason]
    REASON_CANCELLED: _ClassVar[Reason]
GUARD_MODE_UNSPECIFIED: GuardMode
GUARD_MODE_ENFORCE: GuardMode
GUARD_MODE_MONITOR: GuardMode
GUARD_MODE_OFF: GuardMode
FACE_ACTION_UNSPECIFIED: FaceAction
FACE_ACTION_BLUR: FaceAction
FACE_ACTION_PIXELATE: FaceAction
FACE_ACTION_BLOCK: FaceAction
DECISION_UNSPECIFIED: Decision
DECISION_ALLOWED: Decision
DECISION_REROUTED: Decision
DECISION_FACE_OBFUSCATED: Decision
DECISION_BLOCKED: Decision
REASON_UNSPECIFIED: Reason
REASON_NONE: Reason
REASON_MEMORIZATION: Reason
REASON_PROTECTED_FACE: Reason
REASON_SCREENING_FAILED: Reason
REASON_CANCELLED: Reason

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "height", "width", "steps", "guidance_scale", "seed", "num_images", "mode", "face_action", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FACE_ACTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    mode: GuardMode
    face_action: FaceAction
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., mode: _Optional[_Union[GuardMode, str]] = ..., face_action: _Optional[_Union[FaceAction, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GuardReport(_message.Message):
    __slots__ = ("scores", "first_flagged_step", "steps_computed", "mitigations", "audit")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FLAGGED_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    MITIGATIONS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.ScalarMap[str, float]
    first_flagged_step: int
    steps_computed: int
    mitigations: _containers.RepeatedScalarFieldContainer[str]
    audit: _struct_pb2.Struct
    def __init__(self, scores: _Optional[_Mapping[str, float]] = ..., first_flagged_step: _Optional[int] = ..., steps_computed: _Optional[int] = ..., mitigations: _Optional[_Iterable[str]] = ..., audit: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("index", "seed", "decision", "reason", "png", "report")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    index: int
    seed: int
    decision: Decision
    reason: Reason
    png: bytes
    report: GuardReport
    def __init__(self, index: _Optional[int] = ..., seed: _Optional[int] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., png: _Optional[bytes] = ..., report: _Optional[_Union[GuardReport, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "images", "effective_mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    effective_mode: GuardMode
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., effective_mode: _Optional[_Union[GuardMode, str]] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("request_id", "image_index", "step", "total_steps", "signals", "action")
    class SignalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image_index: int
    step: int
    total_steps: int
    signals: _containers.ScalarMap[str, float]
    action: str
    def __init__(self, request_id: _Optional[str] = ..., image_index: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., signals: _Optional[_Mapping[str, float]] = ..., action: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: StepProgress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[StepProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class ScreenRequest(_message.Message):
    __slots__ = ("image", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScreenResponse(_message.Message):
    __slots__ = ("request_id", "copy_detected", "faces_detected", "faces_matched", "reason", "audit")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COPY_DETECTED_FIELD_NUMBER: _ClassVar[int]
    FACES_DETECTED_FIELD_NUMBER: _ClassVar[int]
    FACES_MATCHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    copy_detected: bool
    faces_detected: int
    faces_matched: int
    reason: Reason
    audit: _struct_pb2.Struct
    def __init__(self, request_id: _Optional[str] = ..., copy_detected: _Optional[bool] = ..., faces_detected: _Optional[int] = ..., faces_matched: _Optional[int] = ..., reason: _Optional[_Union[Reason, str]] = ..., audit: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
