"""Stand-in for ``sites.sdk.sites.utils``: the listing filter ai-wq-package passes to ``list``."""

import enum


class FileType(enum.Enum):
    FILE = "file"
    DIR = "dir"
