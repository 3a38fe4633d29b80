"""The errors a user can fix, each said in one line with exit code 2 by the command line.
Here, below every layer and importing nothing, so that `fedcollm --help` and a refused
command answer before torch or transformers load."""


class DataError(ValueError):
    """A task or data file that cannot be read as it should; names the file and the fix."""


class ModelError(ValueError):
    """A model that cannot be loaded or tuned as configured."""


class RegistryError(ValueError):
    """A registry model that cannot be fetched, verified or converted."""
