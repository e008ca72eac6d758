"""Names every layer shares, defined once."""

IGNORE_INDEX = -100  # a label position that is not trained (prompt tokens, padding)
DEFAULT_ADAPTER = "default"  # the trainable adapter; an init_adapter is loaded frozen as "init"
