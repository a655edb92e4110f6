"""The project's own error types: a user's mistake, not a bug.

``clopdit`` and the launchers print one line for these (the message names what was wrong and
what to do) and exit with code 2; anything else is a bug and keeps its traceback. Each also
derives from the builtin it replaces, so ``except ValueError`` / ``KeyError`` keep working.
"""

from __future__ import annotations


class ClopditError(Exception):
    """A known user error."""

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0]) if self.args else ""


class ConfigError(ClopditError, ValueError):
    """A config file or override that does not fit the config's dataclass."""


class RunDirError(ClopditError, ValueError):
    """A run directory that is missing, incomplete, or from another version or shard set."""


class ShardError(ClopditError, ValueError):
    """Shards or their manifest: missing, of another schema, or without the asked split."""


class GeneVocabularyError(ShardError, KeyError):
    """Genes or metadata fields asked for that the shards do not carry."""


class CorruptShardError(ShardError, RuntimeError):
    """A shard that cannot be read: missing, truncated or with a failed checksum."""


class SourceError(ClopditError, FileNotFoundError):
    """A SOMA source that does not exist or is not Census-shaped."""


class FilterError(ClopditError, ValueError):
    """An obs filter or held-out study list that cannot be applied to the source."""


class IngestError(ClopditError, ValueError, KeyError):
    """An AnnData file that cannot be ingested as raw counts."""


class PromptError(ClopditError, ValueError):
    """A prompt that names nothing the model can generate."""


class PromptWarning(UserWarning):
    """A prompt that names something the model cannot give (a tissue it was not trained on)
    beside what it can: the cells are generated over all values of that field, and ``clopdit
    generate`` prints this as one line."""
