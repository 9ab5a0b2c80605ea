"""The per-member worker: download, validate, infer, write GRIB windows, upload, clean up.

Heavy imports (torch, anemoi, earthkit) happen inside the submodules that need them.
"""
