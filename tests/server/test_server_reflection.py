"""A generic client with no MemGuard stubs: everything it knows comes from server reflection."""
from __future__ import annotations

import io

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from server_testlib import channel


def test_reflection_lists_services_and_drives_generate(server):
    with channel(server) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"memguard.v1.MemGuard", "memguard.v1.IndexAdmin", "grpc.health.v1.Health"} <= services

        pool = DescriptorPool(db)   # a fresh pool: nothing from the generated modules
        method = pool.FindServiceByName("memguard.v1.MemGuard").methods_by_name["Generate"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        allowed = pool.FindEnumTypeByName("memguard.v1.Decision").values_by_name["DECISION_ALLOWED"].number

        call = ch.unary_unary("/memguard.v1.MemGuard/Generate", request_serializer=request_cls.SerializeToString,
                              response_deserializer=response_cls.FromString)
        response = call(request_cls(prompt="a small white cottage", steps=2, seed=9), timeout=120)

    [image] = response.images
    assert image.decision == allowed and image.seed == 9
    pixels = np.asarray(Image.open(io.BytesIO(image.png)))
    assert pixels.shape == (64, 64, 3)


def test_reflection_describes_admin_messages(server):
    with channel(server) as ch:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        protect = pool.FindMessageTypeByName("memguard.v1.ProtectRequest")
    assert {f.name for f in protect.fields} == {"image", "face", "reason", "idempotency_key"}
    assert [f.name for f in protect.oneofs_by_name["target"].fields] == ["image", "face"]
