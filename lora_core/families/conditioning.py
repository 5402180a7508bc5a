"""What the UNet is conditioned on: captions through the text encoder(s), and SDXL's size conditioning.

SD1.x/2.x and SDXL differ here and only here, so each is one small strategy
object with the same two methods (`encode`, `unet_kwargs`), as sd-scripts'
SDXL trainer overrides a few hooks, instead of `if sdxl` branches in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_core.dataset.train_data import TrainItem
from lora_core.families.loading import BaseModel

__all__ = ["SD15Conditioning", "SDXLConditioning", "TextCondition", "conditioning_for", "join_windows", "token_windows"]


@dataclass
class TextCondition:
    """Encoded captions: the hidden states the UNet attends to, and SDXL's pooled embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[TextCondition]) -> TextCondition:
        pooled = [p.pooled for p in parts if p.pooled is not None]
        return TextCondition(torch.cat([p.hidden for p in parts]), torch.cat(pooled) if pooled else None)


def token_windows(
    tokenizer: Any, captions: list[str], max_token_length: int, device: torch.device
) -> list[torch.Tensor]:
    """Captions as 77-token windows: BOS, up to 75 tokens, EOS, padding; one window per 75 tokens.

    `max_token_length` 150 or 225 (kohya's setting) gives 2 or 3 windows, each
    encoded alone, so long captions are not cut at 75.
    """
    windows = max_token_length // 75
    bodies = [ids[: 75 * windows] for ids in tokenizer(captions, add_special_tokens=False, verbose=False).input_ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunks = []
    for window in range(windows):
        rows = []
        for body in bodies:
            piece = body[75 * window : 75 * (window + 1)]
            rows.append([tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (75 - len(piece)))
        chunks.append(torch.tensor(rows, device=device))
    return chunks


def join_windows(states: list[torch.Tensor]) -> torch.Tensor:
    """The windows' hidden states as one sequence, as sd-scripts joins them: 77, 152 or 227 positions.

    The first window's BOS, each window's 75 inner positions, the last window's
    final position; the inner BOS/EOS pairs are dropped.
    """
    if len(states) == 1:
        return states[0]
    return torch.cat([states[0][:, :1], *(s[:, 1:76] for s in states), states[-1][:, -1:]], dim=1)


class SD15Conditioning:
    """SD1.x/2.x: one CLIP text encoder, its last layer (or the n-th last with `clip_skip`)."""

    notes: tuple[str, ...] = ()

    def __init__(self, base: BaseModel, clip_skip: int, max_token_length: int) -> None:
        self.base, self.clip_skip, self.max_token_length = base, clip_skip, max_token_length

    def encode(self, captions: list[str], device: torch.device) -> TextCondition:
        encoder = self.base.text_encoders[0]
        states = []
        for ids in token_windows(self.base.tokenizers[0], captions, self.max_token_length, device):
            out = encoder(ids, output_hidden_states=True)
            if self.clip_skip > 1:
                hidden = out.hidden_states[-self.clip_skip]
                states.append(getattr(encoder, "text_model", encoder).final_layer_norm(hidden))
            else:
                states.append(out.last_hidden_state)
        return TextCondition(join_windows(states))

    def unet_kwargs(self, text: TextCondition, items: list[TrainItem], device: torch.device) -> dict[str, Any]:
        return {"encoder_hidden_states": text.hidden}


class SDXLConditioning:
    """SDXL: both encoders' penultimate layers side by side, the second's pooled output, and size conditioning."""

    def __init__(self, base: BaseModel, clip_skip: int, max_token_length: int) -> None:
        self.base, self.max_token_length = base, max_token_length
        # sd-scripts' SDXL trainer ignores clip_skip too: the penultimate layer is part of the architecture.
        self.notes = (f"clip_skip {clip_skip} is not used for SDXL (always the penultimate layer)",) * (clip_skip > 1)

    def encode(self, captions: list[str], device: torch.device) -> TextCondition:
        base = self.base
        states, pooled = [], None
        windows = (token_windows(tok, captions, self.max_token_length, device) for tok in base.tokenizers)
        for ids_first, ids_second in zip(*windows, strict=True):
            first = base.text_encoders[0](ids_first, output_hidden_states=True).hidden_states[-2]
            second = base.text_encoders[1](ids_second, output_hidden_states=True)
            states.append(torch.cat([first, second.hidden_states[-2]], dim=-1))
            pooled = second.text_embeds if pooled is None else pooled  # the first window's, as kohya does
        return TextCondition(join_windows(states), pooled)

    def unet_kwargs(self, text: TextCondition, items: list[TrainItem], device: torch.device) -> dict[str, Any]:
        """SDXL's size conditioning per image: original size, crop top-left, target size (height first)."""
        rows = [
            [a.original_height, a.original_width, a.crop_top, a.crop_left, a.bucket_height, a.bucket_width]
            for a in (item.assignment for item in items)
        ]
        time_ids = torch.tensor(rows, dtype=torch.float32, device=device)
        return {
            "encoder_hidden_states": text.hidden,
            "added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": time_ids},
        }


def conditioning_for(base: BaseModel, clip_skip: int, max_token_length: int) -> SD15Conditioning | SDXLConditioning:
    strategy = SDXLConditioning if base.sdxl else SD15Conditioning
    return strategy(base, clip_skip, max_token_length)
