"""The fingerprint index: what the model was trained on and what people asked to protect.

Modules, each with one job: config (IndexConfig, Thresholds), factory (the one place faiss factory
strings are chosen and parsed), vectors (atomic vector/faiss files), manifest, store (SQLite items
and the protected registry), protected (in-memory registry snapshot), signals (one signal's search),
pdq, faces, encoders, sources, builder, screen, calibrate, report, api (`FingerprintIndex`), cli.
Importing this package does no work; import `memguard.index.api.FingerprintIndex` to use it.
"""
