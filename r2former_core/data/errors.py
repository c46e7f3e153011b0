"""Errors of the data layer (sources, poses, images)."""


class DataError(ValueError):
    """Input data that cannot be used; the message says what is wrong and what to do."""


class ImageDecodeError(DataError):
    """An image message or file that cannot be decoded (bad encoding, size or bytes)."""
