"""Errors a user can cause. The CLI prints them as one line and exits non-zero; anything else is a bug."""


class MedsegError(Exception):
    """Bad input: a path, a bundle key, a volume, a run directory. The message is shown as it is."""


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """One line with the closest valid choice for a mistyped option value."""
    if value not in choices:
        import difflib

        match = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise MedsegError(f"{option} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}{hint}")


class BundleError(MedsegError):
    """A bundle (or a ``--set`` override) that does not validate."""


class DataError(MedsegError):
    """An image, label map or dataset that cannot be used."""
