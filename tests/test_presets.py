"""Model presets: every preset is a valid transformers config whose model has exactly our parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from specs_jax.convert.io import disk_hf_name, hf_names, param_specs
from specs_jax.model import list_presets, load_preset
from specs_jax.model.config import PRESET_DIR


@pytest.mark.parametrize("name", list_presets())
def test_preset_matches_transformers_parameters(name):
    hf_cfg = Qwen2_5_VLConfig(**json.loads((PRESET_DIR / f"{name}.json").read_text()))
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    # transformers' on-disk names and shapes, tied weights excluded as save_pretrained does
    ref = {disk_hf_name(k): tuple(v.shape) for k, v in hf.state_dict().items()
           if not (hf_cfg.tie_word_embeddings and k == "lm_head.weight")}
    ours = {disk_hf_name(n): tuple(s) for key, spec in param_specs(load_preset(name)).items()
            for n, s in hf_names(key, spec.shape)}
    assert ours == ref
    if name != "tiny":
        billions = sum(int(np.prod(s)) for s in ours.values()) / 1e9
        print(f"{name}: {billions:.3f}B parameters")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'.*qwen2.5-vl-7b"):
        load_preset("qwen9")
