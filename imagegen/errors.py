"""Typed errors. Every error imagegen raises on purpose derives from ImagegenError, names the file, field
or value at fault, and is shown by the CLI as one line instead of a traceback."""


class ImagegenError(Exception):
    """Base class of the errors imagegen raises on purpose."""


class ConfigError(ImagegenError, ValueError):
    """An unknown config key, a value of the wrong type, or a value out of range."""


class DataError(ImagegenError):
    """A data source that cannot be read."""


class IDXError(DataError):
    """A malformed IDX file (bad magic, dtype, dimensions, size or labels)."""


class ImageFileError(DataError):
    """An image file that cannot be used (corrupt, truncated, empty, wrong format, too large)."""


class ImageTooLargeError(ImageFileError):
    """An image over the pixel limit, or a decompression bomb: refused before it is decoded."""


class DownloadError(DataError):
    """A download that failed or was truncated; nothing is left at the final path."""


class ChecksumError(DownloadError):
    """A downloaded file whose SHA-256 does not match the pinned value."""


class CheckpointError(ImagegenError):
    """A run folder or checkpoint that is missing, corrupt, or not safe to load."""


class TrainingError(ImagegenError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""


class ExportError(ImagegenError):
    """A model that cannot be exported, or an export whose outputs do not match torch."""
