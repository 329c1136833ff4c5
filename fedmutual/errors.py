"""Errors a person can act on.

Every error fedmutual raises on purpose derives from :class:`FedmutualError`.
The command line prints its message alone and exits with status 2; tracebacks
are reserved for bugs (or ``--debug``).
"""


class FedmutualError(Exception):
    """A problem with the user's input or environment, explained in the message."""

    exit_code = 2


class ConfigError(FedmutualError):
    """An unknown key or an invalid value in the configuration."""


class DataError(FedmutualError):
    """A dataset that is missing, corrupt or inconsistent."""


class NonFiniteLossError(FedmutualError):
    """A NaN or Inf loss; names the client and the round."""

    def __init__(self, client: int | str, round: int, value: float):
        self.client, self.round, self.value = client, round, value
        super().__init__(
            f"non-finite loss ({value}) on client {client} in round {round}; "
            "the run was stopped, metrics of the completed rounds are on disk. "
            "Try a smaller --lr."
        )
