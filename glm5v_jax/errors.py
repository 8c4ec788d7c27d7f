"""Errors raised for bad configuration, always naming the offending field."""


class ConfigError(ValueError):
    """A configuration value that cannot work.

    `field` is the dotted name of the offending field (for example
    `config.model.backbone.num_kv_heads`); the message says what was expected.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")

    def with_prefix(self, prefix: str) -> "ConfigError":
        """The same error with `prefix.` put in front of the field name."""
        return ConfigError(f"{prefix}.{self.field}", self.detail)


def require(condition: bool, field: str, message: str) -> None:
    """Raise `ConfigError(field, message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(field, message)
