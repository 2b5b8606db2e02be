"""Errors a user can cause. The CLI prints them as one line and exits non-zero; anything else is a bug."""


class MedsegError(Exception):
    """Bad input: a path, a bundle key, a volume, a run directory. The message is shown as it is."""


class BundleError(MedsegError):
    """A bundle (or a ``--set`` override) that does not validate."""


class DataError(MedsegError):
    """An image, label map or dataset that cannot be used."""
