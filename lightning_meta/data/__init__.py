"""Data and task sources, the lowest layer: the task batch (`Episode`, `TaskBatch`, padding), the
episodic datamodule base and its resumable stream, table and corpus readers, tokenizers, and
local paths (folders, `pkg:` data, hub ids in the local cache). Imports nothing above it."""
