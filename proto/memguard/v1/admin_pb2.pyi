from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtectImage(_message.Message):
    __slots__ = ("image", "item_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    item_id: str
    def __init__(self, image: _Optional[bytes] = ..., item_id: _Optional[str] = ...) -> None: ...

class ProtectFace(_message.Message):
    __slots__ = ("photos", "identity")
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    photos: _containers.RepeatedScalarFieldContainer[bytes]
    identity: str
    def __init__(self, photos: _Optional[_Iterable[bytes]] = ..., identity: _Optional[str] = ...) -> None: ...

class ProtectRequest(_message.Message):
    __slots__ = ("image", "face", "reason", "idempotency_key")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    image: ProtectImage
    face: ProtectFace
    reason: str
    idempotency_key: str
    def __init__(self, image: _Optional[_Union[ProtectImage, _Mapping]] = ..., face: _Optional[_Union[ProtectFace, _Mapping]] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ProtectResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UnprotectRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnprotectResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class GetIndexStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IndexStats(_message.Message):
    __slots__ = ("items", "protected_items", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    items: int
    protected_items: int
    details: _containers.ScalarMap[str, float]
    def __init__(self, items: _Optional[int] = ..., protected_items: _Optional[int] = ..., details: _Optional[_Mapping[str, float]] = ...) -> None: ...
