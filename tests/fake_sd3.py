"""A tiny, randomly initialised SD3 pipeline dir built offline (no hub): three text encoders with their
tokenizers (CLIP-L/G stand-ins with a character vocab, a T5 stand-in with a Unigram vocab), a tiny transformer and
a tiny AutoencoderKL (the tiny transformer's 4 latent channels, SD3's 8x down-sampling, SD3.5's scaling and shift
factors), laid out exactly like stabilityai/stable-diffusion-3.5-medium so the real loading code runs."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from engine.backends.sd3.presets import PRESETS

T5_DIM = 64  # >= the two CLIP widths concatenated (32 + 32): SD3 zero-pads CLIP features up to T5's width
POOLED = 16 + 24  # the two CLIP projections, concatenated
WORDS = "a red blue green square circle triangle the digit 7 3 left of right above below two three".split()


def build_fake_sd3(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (root / "_clip_vocab.json").write_text(json.dumps(vocab))
    (root / "_clip_merges.txt").write_text("#version: 0.2\n")
    for i, (sub, proj) in enumerate([("text_encoder", 16), ("text_encoder_2", 24)]):
        clip_tok = CLIPTokenizer(str(root / "_clip_vocab.json"), str(root / "_clip_merges.txt"), model_max_length=77)
        clip_tok.save_pretrained(str(root / ("tokenizer" if i == 0 else "tokenizer_2")))
        cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, projection_dim=proj, max_position_embeddings=77, bos_token_id=0,
                             eos_token_id=1, pad_token_id=1)
        CLIPTextModelWithProjection(cfg).save_pretrained(str(root / sub))
    pieces = ["<pad>", "</s>", "<unk>"] + ["\u2581" + w for w in WORDS]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0, model_max_length=512).save_pretrained(str(root / "tokenizer_3"))
    T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=T5_DIM, d_kv=16, d_ff=64, num_layers=2,
                            num_heads=2)).save_pretrained(str(root / "text_encoder_3"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(root / "scheduler"))
    transformer = SD3Transformer2DModel(**{**PRESETS["tiny"].transformer, "joint_attention_dim": T5_DIM,
                                           "pooled_projection_dim": POOLED})
    transformer.save_pretrained(str(root / "transformer"))
    # 4 blocks = 3 down-samplings: 8x, as SD3's VAE (latent 8 -> 64 px images); SD3.5's latent factors
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=PRESETS["tiny"].transformer["in_channels"],
                        block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(str(root / "vae"))
    index = {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root
