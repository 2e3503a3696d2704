"""A tiny, randomly initialised Z-Image Omni pipeline dir built offline (no hub) from the real component classes:
`ZImageTransformer2DModel` (with the SigLIP branch), `AutoencoderKL` (bf16, with Z-Image's shift/scaling: the Omni
pipeline encodes condition images in bfloat16), a Qwen3 text encoder with a byte-level BPE tokenizer carrying the
chat and vision special tokens, `Siglip2VisionModel` + `Siglip2ImageProcessor`, FlowMatchEulerDiscreteScheduler.
Saved with `ZImageOmniPipeline.save_pretrained`, so the dir layout is the pipeline's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["user assistant make the red square blue turn it into night a green circle on grass",
          "change the colour of the car remove the cat add a hat day dusk dawn sky sea field"]
TEXT_DIM, SIGLIP_DIM, LATENT_CHANNELS = 32, 24, 4
IMAGE_PX = 64  # the Omni pipeline refuses condition images under 64 px a side
TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=64, n_layers=2,
                   n_refiner_layers=1, n_heads=4, n_kv_heads=4, norm_eps=1e-5, qk_norm=True, cap_feat_dim=TEXT_DIM,
                   siglip_feat_dim=SIGLIP_DIM, rope_theta=256.0, t_scale=1000.0, axes_dims=(4, 6, 6),
                   axes_lens=(512, 64, 64))


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIAL[1:], model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model, Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(seed)
    tok = tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, max_position_embeddings=128)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
                        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=IMAGE_PX,
                        scaling_factor=0.3611, shift_factor=0.1159).to(torch.bfloat16).eval()
    siglip = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=SIGLIP_DIM, intermediate_size=48, num_hidden_layers=1,
                                                    num_attention_heads=2, patch_size=16, num_patches=16)).eval()
    processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=16)
    transformer = ZImageTransformer2DModel(**TRANSFORMER).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every path (pad tokens too) non-trivial
        for name, p in transformer.named_parameters():
            if name.endswith("pad_token"):
                p.normal_(0.0, 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer,
                siglip=siglip, siglip_processor=processor)


def build_fake_zimage(root: Path, seed: int = 0) -> Path:
    """Write the tiny Omni pipeline to `root` and return it."""
    from diffusers import ZImageOmniPipeline

    ZImageOmniPipeline(**build_components(seed)).save_pretrained(str(root))
    return root


def source_image(seed: int = 0, px: int = IMAGE_PX):
    """A deterministic RGB PIL image (smooth blobs, so SigLIP and the VAE see structure)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px] / px
    img = np.stack([np.sin(2 * np.pi * (rng.random() * 3 * xx + rng.random() * 2 * yy) + rng.random() * 6)
                    for _ in range(3)], -1)
    return Image.fromarray(((img * 0.5 + 0.5) * 255).astype(np.uint8), "RGB")
