"""Tiny random Qwen2.5-VL models built with transformers and saved with ``save_pretrained``."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMAGE, VSTART, VEND = 299, 297, 296
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_config(tie: bool = False, **text) -> Qwen2_5_VLConfig:
    text_cfg = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, vocab_size=300, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}, tie_word_embeddings=tie)
    text_cfg.update(text)
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=48,
                           fullatt_block_indexes=[1], window_size=56),
        text_config=text_cfg, image_token_id=IMAGE, video_token_id=298, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, tie_word_embeddings=tie)


def random_hf_model(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A model whose weights are large enough that logits differ clearly between positions."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


def image_row(grids: list[tuple[int, int, int]], text: list[list[int]]) -> list[int]:
    """Token ids: text[0], <vision_start> image pads <vision_end>, text[1], ... (len(text) == len(grids)+1)."""
    row = list(text[0])
    for (t, h, w), after in zip(grids, text[1:]):
        row += [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND] + list(after)
    return row


def pixels(grids, seed: int = 1) -> np.ndarray:
    n = int(sum(t * h * w for t, h, w in grids))
    return np.random.RandomState(seed).randn(n, PATCH_DIM).astype(np.float32)


def hf_logits(model, ids, mask=None, pixel_values=None, grids=None) -> np.ndarray:
    """transformers' logits; ``mm_token_type_ids`` marks image tokens as its processor would."""
    kw = {"input_ids": torch.tensor(np.asarray(ids))}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(mask))
    if pixel_values is not None:
        kw.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(np.asarray(grids)),
                  mm_token_type_ids=torch.tensor((np.asarray(ids) == IMAGE).astype(np.int64)))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()
