"""Generated stubs for memguard.v1 (memguard_pb2*, admin_pb2*). Regenerate: `python -m memguard.server.protogen`."""
