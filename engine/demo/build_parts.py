"""Parts of the demo model build: its word-level text encoder, the clip pool it trains on, and
resumable checkpoints with a time-budgeted schedule."""
from __future__ import annotations

import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from engine.demo import world

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default: embeddings are zero-padded to this length
TEXT_DIM = 64


# ---- text


def build_tokenizer():
    """Word-level tokenizer over the caption vocabulary, shaped like UMT5's (pad 0, eos 1, unk 2, eos appended)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in world.caption_vocabulary():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
        padding_side="right",
    )


def build_text_encoder(vocab_size: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def encode_captions(work: Path, prompts: list[str]) -> torch.Tensor:
    """Embeddings exactly as WanPipeline computes them (its own method, on our text parts)."""
    from diffusers import WanPipeline
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    pipe = WanPipeline(
        tokenizer=PreTrainedTokenizerFast.from_pretrained(work / "text" / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(work / "text" / "text_encoder"),
        transformer=None,
        vae=None,
        scheduler=None,
    )
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(prompts, max_sequence_length=MAX_SEQUENCE_LENGTH, device=torch.device("cpu"))


# ---- data


def _coverage_and_labels(spec: world.ClipSpec) -> tuple[np.ndarray, str]:
    return world.render_coverage(spec).astype(np.float16), spec.caption.text()


def render_pool(count: int, seed: int, workers: int, *, held_out: bool | None = False
                ) -> tuple[np.ndarray, list[world.ClipSpec]]:
    """Coverage maps (N, T, H, W) float16 of clips of one split (world.all_captions; None: every caption);
    colors are composed later."""
    specs = world.sample_specs(count, seed, held_out=held_out)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_coverage_and_labels, specs, chunksize=64)
    else:
        results = [_coverage_and_labels(s) for s in specs]
    return np.stack([r[0] for r in results]), specs


def compose(coverage: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W) coverage + (B, 3) colors in [0, 255] -> (B, 3, T, H, W) video in [-1, 1]."""
    cov = coverage.float().unsqueeze(1)
    fg = foreground.view(-1, 3, 1, 1, 1) / 127.5 - 1
    bg = background.view(-1, 3, 1, 1, 1) / 127.5 - 1
    return bg * (1 - cov) + fg * cov


def palette_colors(specs: list[world.ClipSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    fg = torch.tensor([world.COLORS[s.color] for s in specs], dtype=torch.float32)
    bg = torch.tensor([world.BACKGROUNDS[s.background] for s in specs], dtype=torch.float32)
    return fg, bg


# ---- checkpoints and schedules


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-save keeps the previous checkpoint


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def time_budget_end(minutes: float) -> float:
    return time.time() + minutes * 60 if minutes > 0 else math.inf


def lr_factor(step: int, total: int, started: float, minutes: float, warmup: int = 200) -> float:
    """Linear warmup, then cosine to 10% over whichever ends first: the steps or the time budget."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if minutes > 0:
        progress = max(progress, (time.time() - started) / (minutes * 60))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
