"""Scorer plug-ins on tiny random weight dirs (tests/fake_scorers.py): the reference formulas of flow_grpo and
GenEval, batching, the registry, missing and corrupt weights named, and the JSON reward-server client against a
local http.server."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.fake_scorers as fs
from engine.eval.prompts import load_eval_prompts
from engine.eval.scorers import ScorerError, build_scorer, find_scorer, scorer_names
from engine.eval.scorers.base import to_pil
from engine.eval.scorers.geneval import (
    evaluate,
    evaluate_reward,
    keep,
    relative_position,
)
from engine.eval.scorers.ocr import levenshtein, ocr_reward, target_text
from engine.eval.table import card_average, markdown

CPU = torch.device("cpu")
PROMPTS = ['a photo of a red cup', 'a neon sign that says "Open Late"', 'a photo of two dogs']


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    return {"clip": fs.build_clip(root / "clip"), "aesthetic": fs.build_aesthetic(root / "aesthetic"),
            "ocr": fs.build_trocr(root / "ocr"),
            "geneval": fs.build_geneval(root / "geneval", {"threshold": 0.0, "counting_threshold": 0.0}),
            "geneval_detr": fs.build_geneval(root / "geneval_detr", {"threshold": 0.0, "counting_threshold": 0.0},
                                             detector="detr")}


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 48, 40, generator=torch.Generator().manual_seed(seed))


def _reference_clip(root: Path, imgs: torch.Tensor, prompts: list[str], padding: bool | str) -> torch.Tensor:
    """logit_scale * cos of the CLIP in `root`, computed as flow_grpo's pickscore_scorer.py:19-47 does."""
    from transformers import CLIPModel, CLIPProcessor

    proc, model = CLIPProcessor.from_pretrained(str(root)), CLIPModel.from_pretrained(str(root)).eval()
    with torch.no_grad():
        img = model.get_image_features(**proc(images=to_pil(imgs), return_tensors="pt")).pooler_output
        txt = model.get_text_features(**proc(text=prompts, padding=padding, truncation=True, max_length=77,
                                             return_tensors="pt")).pooler_output
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (txt @ img.T)).diag()


def test_pickscore_clip_and_aesthetic_follow_flow_grpo_and_batching_does_not_matter(dirs: dict[str, Path]) -> None:
    imgs = images()
    pick = build_scorer("pickscore", str(dirs["clip"]), CPU)
    got = pick.score(imgs, PROMPTS, [{}] * 3)
    np.testing.assert_allclose(got, _reference_clip(dirs["clip"], imgs, PROMPTS, True).numpy(), rtol=1e-5, atol=1e-5)
    pick.batch = 1
    np.testing.assert_allclose(pick.score(imgs, PROMPTS, [{}] * 3), got, rtol=1e-5, atol=1e-5)
    clip = build_scorer("clip", str(dirs["clip"]), CPU)
    ref = _reference_clip(dirs["clip"], imgs, PROMPTS, "max_length") / 30
    np.testing.assert_allclose(clip.score(imgs, PROMPTS, [{}] * 3), ref.numpy(), rtol=1e-5, atol=1e-5)

    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPProcessor

    aes = build_scorer("aesthetic", str(dirs["aesthetic"]), CPU)
    proc = CLIPProcessor.from_pretrained(str(dirs["aesthetic"]))
    model = CLIPModel.from_pretrained(str(dirs["aesthetic"])).eval()
    state = load_file(str(dirs["aesthetic"] / "aesthetic_mlp.safetensors"))
    with torch.no_grad():
        h = model.get_image_features(**proc(images=to_pil(imgs), return_tensors="pt")).pooler_output
        h = h / h.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # Linear layers of the LAION MLP, no activation between them
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(aes.score(imgs, PROMPTS, [{}] * 3), h[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_ocr_reward_is_flow_grpos_rule() -> None:
    assert target_text('A sign that reads "Try Our New Burger" at dusk') == "Try Our New Burger"
    assert target_text("a photo of a cat") is None and target_text('one " quote') is None
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_reward("Menu: TRY OUR NEW BURGER today", "Try Our New Burger") == 1.0  # contained, spaces/case ignored
    assert ocr_reward("hell0", "hello") == pytest.approx(0.8)
    assert ocr_reward("", "hello") == 0.0
    assert ocr_reward("completely unrelated words here", "hi") == 0.0  # distance capped at len(target)


def test_ocr_scorer_reads_with_the_transformers_model(dirs: dict[str, Path]) -> None:
    from transformers import AutoProcessor, VisionEncoderDecoderModel

    ocr = build_scorer("ocr", str(dirs["ocr"]), CPU)
    assert [ocr.applies(p, {}) for p in PROMPTS] == [False, True, False]
    imgs = images(2, seed=3)
    prompts = ['a sign that says "ab"', 'a card with "Open Late" on it']
    got = ocr.score(imgs, prompts, [{}, {}])
    proc = AutoProcessor.from_pretrained(str(dirs["ocr"]))
    model = VisionEncoderDecoderModel.from_pretrained(str(dirs["ocr"])).eval()
    ids = model.generate(pixel_values=proc(images=to_pil(imgs), return_tensors="pt")["pixel_values"],
                         max_new_tokens=64, num_beams=1, do_sample=False)
    readings = proc.batch_decode(ids, skip_special_tokens=True)
    assert got.tolist() == [ocr_reward(r, t) for r, t in zip(readings, ["ab", "Open Late"])]
    with pytest.raises(ScorerError, match="without a quoted text"):
        ocr.score(imgs[:1], ["a photo of a cat"], [{}])


def test_paddleocr_dir_without_the_package_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "det").mkdir()
    (tmp_path / "rec").mkdir()
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # import fails as when it is not installed
    with pytest.raises(ScorerError, match="paddleocr package is not installed"):
        build_scorer("ocr", str(tmp_path), CPU)


def box(x1: float, y1: float, x2: float, y2: float, score: float = 0.95) -> tuple[np.ndarray, float]:
    return np.array([x1, y1, x2, y2], dtype=np.float64), score


def test_geneval_rules_follow_the_official_evaluator() -> None:
    assert relative_position(box(0, 40, 10, 50), box(40, 40, 50, 50)) == {"left of"}
    assert relative_position(box(40, 0, 50, 10), box(40, 40, 50, 50)) == {"above"}
    assert relative_position(box(0, 0, 10, 10), box(1, 1, 11, 11)) == set()  # inside the 0.1 x size dead zone
    red = lambda found, cls: ["red"] * len(found)  # noqa: E731
    counting = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    two = {"dog": [box(0, 0, 10, 10), box(20, 0, 30, 10)]}
    three = {"dog": [*two["dog"], box(40, 0, 50, 10)]}
    assert evaluate(two, counting, red) and not evaluate(three, counting, red)  # exclude: >= 3 dogs fails
    assert not evaluate({"dog": two["dog"][:1]}, counting, red)
    assert evaluate_reward(two, counting, red) == (True, 1.0)
    assert evaluate_reward({"dog": two["dog"][:1]}, counting, red) == (False, 0.5)
    colors = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
    cup = {"cup": [box(0, 0, 10, 10)]}
    assert not evaluate(cup, colors, red) and evaluate(cup, colors, lambda f, c: ["purple"])
    assert evaluate_reward(cup, colors, red) == (False, 0.5)
    position = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                               {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    scene = {"laptop": [box(0, 0, 10, 10)], "cow": [box(40, 0, 50, 10)]}
    assert evaluate(scene, position, red) and evaluate_reward(scene, position, red) == (True, 1.0)
    flipped = {"laptop": [box(40, 0, 50, 10)], "cow": [box(0, 0, 10, 10)]}
    assert not evaluate(flipped, position, red)
    assert evaluate_reward(flipped, position, red) == (False, pytest.approx((1 + 1 + 0 + 1) / 4))
    assert not evaluate({"cow": scene["cow"]}, position, red)  # no target object: fails
    two_obj = {"tag": "two_object", "include": [{"class": "bowl", "count": 1}, {"class": "skis", "count": 1}]}
    assert evaluate({"bowl": cup["cup"], "skis": cup["cup"]}, two_obj, red)
    assert not evaluate({"bowl": cup["cup"]}, two_obj, red)
    # thresholds: 0.3, counting 0.9 (mask2former's confidence scale), most confident first, at most 16
    dets = [box(0, 0, 1, 1, s) for s in (0.5, 0.95, 0.2, *[0.99] * 20)]
    assert [s for _, s in keep(dets, "colors")][:2] == [0.99, 0.99] and len(keep(dets, "colors")) == 16
    assert len(keep(dets[:3], "colors")) == 2 and len(keep(dets[:3], "counting")) == 1


def test_geneval_scorer_on_owlvit_and_detr_and_the_tag_average(dirs: dict[str, Path]) -> None:
    meta = [{"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}]},
            {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}]
    for key in ("geneval", "geneval_detr"):
        g = build_scorer("geneval", str(dirs[key]), CPU)
        assert not g.applies("a photo", {"task": "ocr"}) and g.applies("a photo", meta[0])
        raw = g.detector(to_pil(images(2)), 0.0)
        assert len(raw) == 2 and sum(len(v) for v in raw[0].values()) > 0  # random weights, threshold 0: boxes
        for boxes in raw[0].values():
            for b, s in boxes:
                assert 0 <= s <= 1 and b.shape == (4,)
        got = g.score(images(2), ["a photo of a red cup", "a photo of two dogs"], meta)
        assert set(got.tolist()) <= {0.0, 1.0}
        reward = build_scorer("geneval_reward", str(dirs[key]), CPU).score(images(2), ["a", "b"], meta)
        assert ((0 <= reward) & (reward <= 1)).all()
    # summary_scores.py: mean over tags of each tag's mean, not the mean over images
    assert g.aggregate(np.array([1.0, 1.0, 0.0]), [{"tag": "a"}, {"tag": "a"}, {"tag": "b"}]) == 0.5
    with pytest.raises(ScorerError, match="GenEval metadata"):
        g.score(images(1), ["x"], [{"task": "ocr"}])


def test_registry_names_and_world_scorers() -> None:
    assert {"pickscore", "clip", "aesthetic", "ocr", "geneval", "geneval_reward", "deqa",
            "unifiedreward"} <= set(scorer_names())
    with pytest.raises(ScorerError, match="unknown scorer 'nope'; valid: .*pickscore"):
        build_scorer("nope", "", CPU)
    entry = find_scorer("toy:task")  # found through its world's prefix (engine/worlds), never named by engine/eval
    assert entry is not None and entry.weights == "none"
    from engine.worlds.toy.world import eval_prompts, parse_prompt, render

    prompts = eval_prompts()[::10]
    rng = np.random.default_rng(0)
    truth = torch.stack([torch.as_tensor(render(parse_prompt(p), rng)) for p in prompts]).float()
    task = build_scorer("toy:task", "", CPU).score((truth + 1) / 2, prompts, [{}] * len(prompts))
    assert (task > 0.9).all()  # the ground-truth renders score near 1, as tests/test_toy_world.py checks
    with pytest.raises(ValueError, match="loads no weights"):
        build_scorer("toy:quality", "/some/dir", CPU)


def test_missing_and_corrupt_weights_are_named(dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ScorerError, match=r"scorer 'pickscore': weights not found: /no/such/dir"):
        build_scorer("pickscore", "/no/such/dir", CPU)
    with pytest.raises(ScorerError, match=r"scorer 'geneval': weights not found: .*clip/config.json"):
        build_scorer("geneval", str(dirs["clip"]), CPU)
    import shutil

    bad = shutil.copytree(dirs["aesthetic"], tmp_path / "aesthetic")
    (bad / "aesthetic_mlp.safetensors").unlink()
    with pytest.raises(ScorerError, match=r"weights not found: .*aesthetic_mlp.safetensors"):
        build_scorer("aesthetic", str(bad), CPU)
    torn = shutil.copytree(dirs["clip"], tmp_path / "torn")
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(ScorerError, match=r"corrupt file .*torn/model.safetensors"):
        build_scorer("clip", str(torn), CPU)
    garbled = shutil.copytree(dirs["clip"], tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(ScorerError, match=r"corrupt file .*garbled/config.json"):
        build_scorer("clip", str(garbled), CPU)
    from engine.files import write_sha256sums

    summed = shutil.copytree(dirs["clip"], tmp_path / "summed")
    write_sha256sums(summed)
    (summed / "tokenizer_config.json").write_text(json.dumps({"changed": True}))
    with pytest.raises(ScorerError, match=r"summed/tokenizer_config.json is corrupt"):
        build_scorer("pickscore", str(summed), CPU)


class _Server:
    """A local JSON reward server (loopback only): score = 5 x the image's mean pixel value."""

    def __init__(self, fail_first: int = 0, answer: object = None):
        self.requests: list[dict] = []
        self.fail_first, self.answer = fail_first, answer
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"content_type": self.headers["Content-Type"], **body})
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                from PIL import Image

                scores = [5 * float(np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))).mean() / 255)
                          for b in body["images"]]
                out = json.dumps({"scores": scores} if outer.answer is None else outer.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_scorer_sends_json_png_batches_and_checks_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.eval.scorers import server

    monkeypatch.setattr(server.time, "sleep", lambda s: None)
    imgs = images(5, seed=4)
    expected = 5 * (imgs.clamp(0, 1) * 255).round().double().mean(dim=(1, 2, 3)).numpy() / 255
    with _Server(fail_first=1) as srv:
        deqa = build_scorer("deqa", srv.url, CPU)
        deqa.batch = 2
        meta = [{"task": "pickscore", "i": i} for i in range(5)]
        got = deqa.score(imgs, [f"p{i}" for i in range(5)], meta)
        np.testing.assert_allclose(got, expected, rtol=1e-12)  # PNG is lossless: the uint8 pixels arrive as sent
        ok = srv.requests[1:]  # the first try got a 500 and was retried
        assert [len(r["images"]) for r in ok] == [2, 2, 1] and ok[0]["content_type"] == "application/json"
        assert ok[2]["prompts"] == ["p4"] and ok[2]["metadata"] == [meta[4]]
    with _Server(answer={"scores": [1.0]}) as srv, pytest.raises(ScorerError, match="2 finite numbers"):
        build_scorer("unifiedreward", srv.url, CPU).score(imgs[:2], ["a", "b"], [{}, {}])
    with _Server(answer=["not", "an", "object"]) as srv, pytest.raises(ScorerError, match="expected an object"):
        build_scorer("deqa", srv.url, CPU).score(imgs[:1], ["a"], [{}])
    with _Server(fail_first=10) as srv, pytest.raises(ScorerError, match=r"answered 500"):
        build_scorer("deqa", srv.url, CPU).score(imgs[:1], ["a"], [{}])
    with pytest.raises(ScorerError, match="http:// or https:// URL"):
        build_scorer("deqa", "/models/deqa", CPU)


def test_card_average_and_table_columns() -> None:
    base = {"geneval": 0.63, "ocr": 0.59, "deqa": 4.07, "pickscore": 21.64}
    opd = {"geneval": 0.92, "ocr": 0.94, "deqa": 4.35, "pickscore": 23.08}
    assert round(card_average(base), 2) == 0.72 and round(card_average(opd), 2) == 0.90  # the card's Average
    assert card_average({"clip": 0.3}) is None
    text = markdown({"base": {**base, "clip": 0.31, "average": card_average(base)}},
                    ["pickscore", "clip", "deqa", "ocr", "geneval"])
    assert text.splitlines()[0] == "| model | GenEval | OCR | DeQA | PickScore | clip | Average |"
    assert text.splitlines()[2] == "| base | 0.630 | 0.590 | 4.070 | 21.64 | 0.310 | 0.717 |"
    assert "| Average (GenEval, OCR) |" in markdown({}, ["ocr", "geneval"])


def test_eval_prompt_sets_load_as_published(tmp_path: Path) -> None:
    # lines as in Flow-OPD dataset/geneval/test_metadata.jsonl and dataset/ocr/test.txt
    geneval = tmp_path / "test_metadata.jsonl"
    geneval.write_text(
        '{"tag": "counting", "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": "wine glass", '
        '"count": 3}], "prompt": "a photo of two wine glasses"}\n'
        '{"tag": "position", "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": '
        '["right of", 0]}], "prompt": "a photo of a cow right of a laptop"}\n')
    ocr = tmp_path / "test.txt"
    ocr.write_text('A close-up of a sleek smartwatch on a wrist, the screen displaying "Step Goal Achieved" with a '
                   'celebratory animation.\n\nA photo of a cat\n')
    rows = load_eval_prompts(str(geneval))
    assert [r.task for r in rows] == ["geneval", "geneval"] and rows[1].metadata["include"][1]["position"][0] == \
        "right of"
    texts = load_eval_prompts(str(ocr))
    assert len(texts) == 2 and target_text(texts[0].text) == "Step Goal Achieved" and texts[1].task == "default"
    assert len(load_eval_prompts(str(geneval), limit=1)) == 1
    assert load_eval_prompts("builtin:tiny")[0].task == "compose"
    with pytest.raises(ValueError, match=r"test_metadata.jsonl:1: expected a JSON object"):
        geneval.write_text('{"tag": "x"}\n')
        load_eval_prompts(str(geneval))
