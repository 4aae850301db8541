"""The exceptions kernelhub raises on purpose; the CLI prints these as one line, not a traceback."""


class KernelhubError(Exception):
    """Base class: a problem the user can act on, described in the message."""


class InvalidConfigError(KernelhubError, ValueError):
    """A launch config that is not a member of its family's search space."""


class UnknownFamilyError(KernelhubError):
    """A kernel family name that is not registered (a loader failure is a plain KernelhubError)."""


class ConfigDBError(KernelhubError):
    """The config database cannot be opened, read or written (message says which and why)."""


class DeviceMismatchError(KernelhubError):
    """A command asked for one GPU key on a machine whose device has another."""


class CollectiveError(KernelhubError, RuntimeError):
    """A collective op could not complete: a peer rank rejected its arguments, failed or timed out."""
