"""(placeholder module, being filled in)."""

SPECS = ()
