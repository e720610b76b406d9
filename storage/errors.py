"""The kdcache error family.

Every user mistake raises a ``KDCacheError``: its message is one line that says what was
expected, what was found and how to fix it. The CLI prints that line and exits with the error's
``exit_code``: 2 for what was passed, 1 for damaged data (``IntegrityError``).
"""


class KDCacheError(ValueError):
    """Base class: a user-facing error with a one-line message."""

    exit_code = 2  # the CLI's: a usage error (what was passed is wrong)


class NotACacheError(KDCacheError):
    """The path holds no manifest and no committed part."""


class FormatVersionError(KDCacheError):
    """The cache was written in a format or version this kdcache does not know."""


class NotFinalizedError(KDCacheError):
    """Parts are committed but the cache-level manifest has not been built yet."""


class MissingPartError(KDCacheError):
    """A part listed in the manifest (or expected by the shard count) is missing."""


class IntegrityError(KDCacheError):
    """Stored bytes do not match their checksum, or the structure is inconsistent."""

    exit_code = 1  # a verdict on the data (damage), like `kdcache verify`'s


class CacheMismatchError(KDCacheError):
    """The output path already holds a cache made with other settings."""


class ConfigError(KDCacheError):
    """A configuration value is invalid (reports every problem at once)."""


class PartLockedError(KDCacheError):
    """Another writer holds a live lease on the part."""


class WriteFailedError(KDCacheError):
    """Writing a part failed (disk full, I/O error); what was flushed before stays resumable."""
