"""The prime-sandboxes release this suite runs under, as a comparable tuple."""

from importlib.metadata import version

RELEASE = tuple(int(part) for part in version("prime-sandboxes").split("."))
