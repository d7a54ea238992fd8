"""A timm model's Hub folder: ``config.json`` (timm's, which transformers also reads) and
``model.safetensors``. The student's release, a fine-tuned classifier and the offline teachers are
written so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from timm.models._hub import save_config_for_hf
from torch import nn

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def write_timm_config(
    model: nn.Module,
    path: Path,
    data_config: Mapping[str, Any] | None = None,
    *,
    label_names: Sequence[str] | None = None,
) -> dict:
    """Write timm's Hub ``config.json`` for ``model`` at ``path`` so that timm *and* transformers load it.

    timm's ``save_config_for_hf`` writes ``num_classes`` into ``model_args``, which transformers'
    ``TimmWrapperModel`` (that passes ``num_classes`` itself) rejects: it is removed; the root
    ``num_classes`` still tells timm which head to build. ``label_names`` (a classifier's, one per
    output) become transformers' ``id2label``. Returns the written config.
    """
    save_config_for_hf(
        model,
        str(path),
        model_config={"label_names": list(label_names)} if label_names else None,
        data_config=dict(data_config) if data_config else None,
    )
    config = json.loads(path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config
