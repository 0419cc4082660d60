"""The gRPC service over a guard engine: admission and micro-batching, auth, metrics export.

Imports flow server → guard → kernels; nothing in guard/ imports this package.
"""
