"""Run configs: `core` (the leaf: errors, arg parsing, derive, checks) and `schema` (every
owner's section assembled into `base_config()`, and `validate()`)."""
