"""The public API's .proto files and their generated Python stubs (`memguard.proto.memguard.v1`)."""
