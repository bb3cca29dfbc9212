"""The installed version of lightning-meta: the one in pyproject.toml, read from the package metadata."""

from importlib.metadata import version

#: The distribution name (``pip install lightning-meta``).
DISTRIBUTION = "lightning-meta"

#: The installed version (also ``lightning_meta.__version__``).
VERSION = version(DISTRIBUTION)
