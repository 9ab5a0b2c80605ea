"""Test and demo support: tiny checkpoint, synthetic inputs, GCS emulator (worker-side imports)."""
