"""Tiny, randomly initialised scorer weight dirs built offline with the real transformers classes, laid out as
docs/evaluation.md says: CLIP (PickScore / CLIP score), CLIP + an aesthetic head, TrOCR, GenEval (OWL-ViT or DETR
+ CLIP). Random weights give arbitrary but deterministic scores: the tests check the plumbing and the rules, not
the models' judgement."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def _clip_tokenizer(root: Path):
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    # special tokens last, as in CLIP's vocab (49406, 49407): OWL-ViT treats a query starting with id 0 as padding
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    root.mkdir(parents=True, exist_ok=True)
    (root / "_vocab.json").write_text(json.dumps(vocab))
    (root / "_merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "_vocab.json"), str(root / "_merges.txt"), model_max_length=77)
    (root / "_vocab.json").unlink()
    (root / "_merges.txt").unlink()
    return tok, len(vocab)


def _clip_configs(vocab: int, max_pos: int = 77) -> tuple[dict, dict]:
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=max_pos, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    return text, vision


def build_clip(root: Path, seed: int = 0) -> Path:
    """A CLIPModel (projection 16) + CLIPProcessor (32 px) dir."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok, vocab = _clip_tokenizer(root)
    text, vision = _clip_configs(vocab)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(root))
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(str(root))
    return root


def build_aesthetic(root: Path) -> Path:
    """CLIP + `aesthetic_mlp.safetensors`: the LAION head's layer indices (0, 2, 4, 6, 7) at small widths."""
    build_clip(root, seed=1)
    g = torch.Generator().manual_seed(2)
    dims = [(0, 16, 12), (2, 12, 8), (4, 8, 8), (6, 8, 4), (7, 4, 1)]
    state = {}
    for i, d_in, d_out in dims:
        state[f"layers.{i}.weight"] = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        state[f"layers.{i}.bias"] = torch.randn(d_out, generator=g)
    save_file(state, str(root / "aesthetic_mlp.safetensors"))
    return root


def build_trocr(root: Path) -> Path:
    """A VisionEncoderDecoderModel (ViT encoder, TrOCR decoder) + TrOCRProcessor with a character vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        TrOCRConfig,
        TrOCRProcessor,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS + " ")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    dec = TrOCRConfig(vocab_size=len(vocab), d_model=32, decoder_layers=1, decoder_attention_heads=2,
                      decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      decoder_start_token_id=2)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 1, 2
    torch.manual_seed(3)
    VisionEncoderDecoderModel(config=cfg).save_pretrained(str(root))
    TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=tok).save_pretrained(str(root))
    return root


def build_owlvit(root: Path) -> Path:
    """An OwlViTForObjectDetection + OwlViTProcessor (32 px, text queries up to 77 tokens)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    tok, vocab = _clip_tokenizer(root)
    text, vision = _clip_configs(vocab)
    torch.manual_seed(4)
    OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision,
                                          projection_dim=32)).save_pretrained(str(root))  # = text width
    image = OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    OwlViTProcessor(image_processor=image, tokenizer=tok).save_pretrained(str(root))
    return root


def build_detr(root: Path) -> Path:
    """A DetrForObjectDetection (ResNet backbone from its config, no timm, COCO names as id2label) + processor."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    from engine.eval.scorers.geneval import COCO_CLASSES

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage4"])
    labels = dict(enumerate(COCO_CLASSES))
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, id2label=labels,
                     label2id={c: i for i, c in labels.items()})
    torch.manual_seed(6)
    DetrForObjectDetection(cfg).save_pretrained(str(root))
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(str(root))
    return root


def build_geneval(root: Path, thresholds: dict[str, float] | None = None, detector: str = "owlvit") -> Path:
    """`detector/` (OWL-ViT or DETR) + `clip/` (+ `geneval.json` with `thresholds`)."""
    (build_owlvit if detector == "owlvit" else build_detr)(root / "detector")
    build_clip(root / "clip", seed=5)
    if thresholds:
        (root / "geneval.json").write_text(json.dumps(thresholds))
    return root
