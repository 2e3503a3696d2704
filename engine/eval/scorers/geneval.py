"""GenEval's rules (object presence, count, colour, relative position, co-occurrence) on a transformers detector.

The rules are the official evaluator's, line for line (djghosh13/geneval `evaluation/evaluate_images.py`):
detections per class sorted by confidence, kept above 0.3 (0.9 for `counting` prompts), at most 16 per class, no
NMS (lines 223-245, 286-290); `evaluate` (lines 160-220): every `include` clause needs >= count objects of its
class, the most confident `count` of them of the asked colour and in the asked relation to every object of the
clause it refers to; every `exclude` clause fails at >= count objects; `relative_position` with a 0.1 x (sum of
the box sizes) dead zone (lines 140-157); colours by CLIP zero-shot over 10 colours with its 3 templates (lines
76, 109-127). The score is the overall GenEval score: the fraction of correct images per tag, averaged over the
tags (`evaluation/summary_scores.py:36-45`). `geneval_reward` is Flow-GRPO's training reward instead: the
reward-server's partial credit (yifan123/reward-server `reward_server/gen_eval.py:201-264`: exact counts, per
clause 1 - |count error| / count, colour and position terms).

What approximates what: the official detector is mmdetection's Mask2Former (Swin-S, COCO); here any transformers
detector from a local dir: OWL-ViT / OWLv2 (open-vocabulary, queried with `a photo of a <class>` for the 80 COCO
classes) or a COCO-trained DETR-style model (its `id2label`). Their confidence scales differ from Mask2Former's,
so the thresholds are settable in `geneval.json`. Colour crops are the detected box without Mask2Former's
instance mask (the official crop greys out pixels outside the mask, lines 94-106), so background colour leaks in.
Scores from this scorer are therefore close to, not equal to, published GenEval numbers.

Dir layout: `detector/` (the detector and its processor), `clip/` (CLIP for colours, e.g. ViT-L/14 as the
official open_clip ViT-L-14), optional `geneval.json` ({"threshold", "counting_threshold", "max_objects",
"nms_threshold", "position_threshold"}).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.eval.scorers import register_scorer
from engine.eval.scorers.base import (
    BaseScorer,
    Metadata,
    ScorerError,
    batches,
    check_dir,
    check_processor,
    embedding,
    load_pretrained,
    to_pil,
)

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # evaluation/object_names.txt of the official evaluator
DEFAULTS: dict[str, float] = dict(threshold=0.3, counting_threshold=0.9, max_objects=16, nms_threshold=1.0,
                                  position_threshold=0.1)

Box = tuple[np.ndarray, float]
"""(x1, y1, x2, y2) in pixels, confidence."""
Detections = dict[str, list[Box]]
ColorFn = Callable[[list[Box], str], list[str]]
"""(objects of one class, class name) -> each object's colour name."""


def compute_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Box IoU with the official +1 pixel convention (evaluate_images.py:130-137)."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(a: Box, b: Box, threshold: float = DEFAULTS["position_threshold"]) -> set[str]:
    """Relations of object a to object b, beyond a dead zone of `threshold` x (size a + size b)."""
    boxes = np.array([a[0], b[0]], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def keep(boxes: Sequence[Box], tag: str, opts: Mapping[str, float] = DEFAULTS) -> list[Box]:
    """One class's detections kept by the official rule: above the tag's threshold, most confident first, at most
    max_objects, greedy NMS at nms_threshold (1.0 = none)."""
    thr = opts["counting_threshold"] if tag == "counting" else opts["threshold"]
    order = sorted((b for b in boxes if b[1] > thr), key=lambda b: -b[1])[: int(opts["max_objects"])]
    out: list[Box] = []
    while order:
        best = order.pop(0)
        out.append(best)
        order = [b for b in order if opts["nms_threshold"] == 1 or compute_iou(best[0], b[0]) < opts["nms_threshold"]]
    return out


def evaluate(objects: Detections, metadata: Metadata, colors: ColorFn,
             position_threshold: float = DEFAULTS["position_threshold"]) -> bool:
    """The official `evaluate`: is the image correct for its metadata (module docstring)?"""
    correct = True
    matched_groups: list[list[Box] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])[:n]
        matched = len(found) >= n
        if matched and "color" in req and colors(found, cls).count(req["color"]) < n:
            matched = False
        if matched and "position" in req:
            rel, target = req["position"]
            group = matched_groups[target]
            matched = group is not None and all(rel in relative_position(o, t, position_threshold)
                                                for o in found for t in group)
        correct &= matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
    return correct


def evaluate_reward(objects: Detections, metadata: Metadata, colors: ColorFn,
                    position_threshold: float = DEFAULTS["position_threshold"]) -> tuple[bool, float]:
    """The reward-server's `evaluate_reward`: (strictly correct, partial-credit reward in [0, 1])."""
    correct = True
    rewards: list[float] = []
    matched_groups: list[list[Box] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])
        matched = True
        rewards.append(1 - abs(n - len(found)) / n)
        if len(found) != n:
            correct = matched = False
            if "color" in req or "position" in req:
                rewards.append(0.0)
        else:
            if "color" in req:
                hits = colors(found, cls).count(req["color"])
                rewards.append(1 - abs(n - hits) / n)
                if hits != n:
                    correct = matched = False
            if "position" in req and matched:
                rel, target = req["position"]
                group = matched_groups[target]
                if group is None:
                    correct = matched = False
                    rewards.append(0.0)
                else:
                    ok = all(rel in relative_position(o, t, position_threshold) for o in found for t in group)
                    if not ok:
                        correct = matched = False
                        rewards.append(0.0)
                    rewards.append(1.0)  # the reward server appends 1.0 after the loop, also after a failure
        matched_groups.append(found if matched else None)
    return correct, (sum(rewards) / len(rewards) if rewards else 0.0)


class Detector:
    """A transformers detector from a local dir: OWL-ViT/OWLv2 (text-queried) or an id2label detector (DETR)."""

    def __init__(self, root: Path, device: torch.device, scorer: str):
        from transformers import AutoConfig, AutoModelForObjectDetection, AutoProcessor

        self.device = device
        cfg = load_pretrained(scorer, root, AutoConfig.from_pretrained)
        self.processor = load_pretrained(scorer, root, AutoProcessor.from_pretrained)
        self.queried = cfg.model_type in ("owlvit", "owlv2")
        if self.queried:
            from transformers import AutoModelForZeroShotObjectDetection as Auto
        else:
            Auto = AutoModelForObjectDetection
        self.model = load_pretrained(scorer, root, lambda p: Auto.from_pretrained(p, local_files_only=True))
        self.model = self.model.eval().requires_grad_(False).to(device)
        if not self.queried:
            labels = {int(k): v for k, v in self.model.config.id2label.items()}
            self.labels = {i: name for i, name in labels.items() if name in COCO_CLASSES}
            if not self.labels:
                raise ScorerError(f"scorer {scorer!r}: {root / 'config.json'}: no id2label name is a COCO class "
                                  f"(e.g. {', '.join(COCO_CLASSES[:3])}); GenEval's rules need COCO labels")

    @torch.no_grad()
    def __call__(self, images: list[Any], floor: float) -> list[dict[str, list[Box]]]:
        """Per image: class -> every detection scoring above `floor` (unsorted)."""
        sizes = [(im.height, im.width) for im in images]
        if self.queried:
            queries = [f"a photo of a {c}" for c in COCO_CLASSES]
            inputs = self.processor(text=[queries] * len(images), images=images, return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model(**inputs)
        post = getattr(self.processor, "post_process_object_detection", None)
        post = post or self.processor.image_processor.post_process_object_detection
        results = post(out, threshold=floor, target_sizes=sizes)
        names = dict(enumerate(COCO_CLASSES)) if self.queried else self.labels
        per_image = []
        for r in results:
            found: dict[str, list[Box]] = {}
            for box, score, label in zip(r["boxes"].tolist(), r["scores"].tolist(), r["labels"].tolist()):
                if int(label) in names:
                    found.setdefault(names[int(label)], []).append((np.array(box, dtype=np.float64), float(score)))
            per_image.append(found)
        return per_image


class ColorClassifier:
    """CLIP zero-shot colour of box crops: the mean of the 3 templates' normalised text embeddings per colour."""

    def __init__(self, root: Path, device: torch.device, scorer: str):
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        self.processor = load_pretrained(scorer, root, CLIPProcessor.from_pretrained)
        self.model = load_pretrained(scorer, root, lambda p: CLIPModel.from_pretrained(p, local_files_only=True))
        self.model = self.model.eval().requires_grad_(False).to(device)
        self._classifiers: dict[str, torch.Tensor] = {}

    def _classifier(self, cls: str) -> torch.Tensor:
        if cls not in self._classifiers:
            texts = [t.format(c=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
            tok = self.processor(text=texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            emb = embedding(self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()})).float()
            emb = torch.nn.functional.normalize(emb, dim=-1).view(len(COLORS), len(COLOR_TEMPLATES), -1)
            self._classifiers[cls] = torch.nn.functional.normalize(emb.mean(1), dim=-1)
        return self._classifiers[cls]

    @torch.no_grad()
    def __call__(self, image: Any, objects: list[Box], cls: str) -> list[str]:
        """The colour of each object of class `cls` in PIL `image`."""
        crops = [image.crop(tuple(float(v) for v in box[:4])) for box, _ in objects]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        emb = embedding(self.model.get_image_features(pixel_values=pixels)).float()
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return [COLORS[i] for i in (emb @ self._classifier(cls).T).argmax(1).tolist()]


class GenEval(BaseScorer):
    """GenEval correctness (`geneval`) or Flow-GRPO's partial-credit reward (`geneval_reward`) per image."""

    batch = 8

    def __init__(self, name: str, path: str | Path, device: torch.device):
        self.name = name
        root = check_dir(name, path, ("detector/config.json", "clip/config.json"))
        check_processor(name, root / "detector")
        check_processor(name, root / "clip")
        self.opts = dict(DEFAULTS)
        if (root / "geneval.json").is_file():
            extra = json.loads((root / "geneval.json").read_text())
            unknown = sorted(set(extra) - set(DEFAULTS))
            if unknown:
                raise ScorerError(f"scorer {name!r}: {root / 'geneval.json'}: unknown keys {unknown}; valid: "
                                  f"{', '.join(DEFAULTS)}")
            self.opts.update({k: float(v) for k, v in extra.items()})
        self.detector = Detector(root / "detector", device, name)
        self.color = ColorClassifier(root / "clip", device, name)

    def applies(self, prompt: str, metadata: Metadata) -> bool:
        """Images with a GenEval metadata row (`include` clauses and a `tag`)."""
        return "include" in metadata and "tag" in metadata

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] 1.0 / 0.0 correctness (geneval) or partial credit (geneval_reward)."""
        bad = next((m for m in metadata if not self.applies("", m)), None)
        if bad is not None:
            raise ScorerError(f"scorer {self.name!r} needs GenEval metadata rows (tag, include); got {dict(bad)}")
        out: list[float] = []
        floor = min(self.opts["threshold"], self.opts["counting_threshold"])
        for s in batches(len(prompts), self.batch):
            pils = to_pil(images[s])
            for pil, raw, meta in zip(pils, self.detector(pils, floor), metadata[s]):
                objects = {c: kept for c, boxes in raw.items() if (kept := keep(boxes, meta["tag"], self.opts))}

                def colors(found: list[Box], cls: str, pil: Any = pil) -> list[str]:
                    return self.color(pil, found, cls)

                pos = self.opts["position_threshold"]
                if self.name == "geneval_reward":
                    out.append(evaluate_reward(objects, meta, colors, pos)[1])
                else:
                    out.append(float(evaluate(objects, meta, colors, pos)))
        return np.array(out, dtype=np.float64)

    def aggregate(self, scores: np.ndarray, metadata: Sequence[Metadata]) -> float:
        """The overall GenEval score: mean over tags of each tag's mean (summary_scores.py:36-45)."""
        if not len(scores):
            return float("nan")
        tags = np.array([m["tag"] for m in metadata])
        return float(np.mean([scores[tags == t].mean() for t in dict.fromkeys(tags.tolist())]))


register_scorer("geneval", lambda path, device: GenEval("geneval", path, device))
register_scorer("geneval_reward", lambda path, device: GenEval("geneval_reward", path, device))
