"""The public API's .proto files and their generated Python stubs (`proto.memguard.v1`)."""
