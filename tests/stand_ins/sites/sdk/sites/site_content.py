"""Stand-in for ``sites.sdk.sites.site_content``: the error the SDK raises when an API call fails."""


class ApiCallException(Exception):
    """An ECBOX API call answered with an error; the message starts with the HTTP status ("404 Not Found: ...")."""

    def __init__(self, status: int, reason: str, detail: str = ""):
        super().__init__(f"{status} {reason}: {detail}" if detail else f"{status} {reason}")
        self.status = status
