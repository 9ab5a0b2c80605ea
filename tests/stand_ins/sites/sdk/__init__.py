"""Stand-in for ``sites.sdk`` (tests and demo only)."""
