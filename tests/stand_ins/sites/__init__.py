"""Stand-in for ECMWF's ECBOX SDK (``sites-toolkit``): see tests/stand_ins/README.md. Tests and demo only."""
