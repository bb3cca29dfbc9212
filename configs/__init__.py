"""Ready YAML configs, one per use case; installed as ``lightning_meta.configs`` package data."""
