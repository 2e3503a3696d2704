"""`python -m engine.eval` on a tiny SD3 pipeline dir with tiny random CLIP / OCR / detector dirs and a local DeQA
server: the Flow-OPD card's table, sample grids, per-image scores, determinism, and scorer problems named before
any model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tests.fake_scorers as fs
from engine.eval.__main__ import main
from engine.eval.table import card_average
from tests.fake_sd3 import build_fake_sd3
from tests.test_eval_scorers import _Server

GENEVAL = [
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
    {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"},
]
OCR = ['a red sign that says "open"', 'a blue square with "77" on it']


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from engine.adapters.export import export_adapter
    from engine.adapters.lora import LoraSpec, random_adapter
    from engine.backends import get_backend

    root = tmp_path_factory.mktemp("cli")
    pipe = build_fake_sd3(root / "sd3")
    backend = get_backend("sd3")
    model, _ = backend.load(pipe, torch.float32)
    random_adapter(model, "a", LoraSpec(4, 4.0), seed=9, std=0.5)
    adapter = export_adapter(model, root / "adapter", backend, "a")
    (root / "geneval_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    (root / "ocr.txt").write_text("\n".join(OCR) + "\n")
    return {"sd3": pipe, "adapter": adapter, "geneval_prompts": root / "geneval_metadata.jsonl",
            "ocr_prompts": root / "ocr.txt", "clip": fs.build_clip(root / "pickscore"),
            "ocr": fs.build_trocr(root / "trocr"),
            "geneval": fs.build_geneval(root / "geneval", {"threshold": 0.0, "counting_threshold": 0.0})}


def _args(inputs: dict[str, Path], out: Path, scorers: str, *extra: str) -> list[str]:
    return ["--model", str(inputs["sd3"]), "--prompts", f"geneval={inputs['geneval_prompts']}",
            "--prompts", f"ocr={inputs['ocr_prompts']}", "--scorers", scorers, "--samples", "2", "--steps", "2",
            "--latent-size", "8", "--max-sequence-length", "12", "--out", str(out), *extra]


def test_table_with_the_cards_columns(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    with _Server() as deqa:
        scorers = (f"geneval={inputs['geneval']},ocr={inputs['ocr']},pickscore={inputs['clip']},"
                   f"deqa={deqa.url}")
        assert main(_args(inputs, out, scorers, "--adapter", str(inputs["adapter"]), "--with-base",
                          "--score-on", "deqa=ocr")) == 0
        assert sum(len(r["images"]) for r in deqa.requests) == 2 * 4  # two rows x the 4 ocr-set images
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0] == "| model | GenEval | OCR | DeQA | PickScore | Average |"
    assert lines[2].startswith("| base | ") and lines[3].startswith(f"| {inputs['adapter']} | ")
    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == ["geneval", "ocr", "deqa", "pickscore"]
    assert table["images"] == {"geneval": 4, "ocr": 4, "deqa": 4, "pickscore": 8}
    for row in table["rows"].values():
        assert row["average"] == pytest.approx(card_average(row))
        assert 0 <= row["geneval"] <= 1 and 0 <= row["ocr"] <= 1 and 0 < row["deqa"] < 5
    assert table["rows"]["base"]["pickscore"] != table["rows"][str(inputs["adapter"])]["pickscore"]
    assert (out / "samples" / "base.png").is_file() and len(list((out / "samples").glob("*.png"))) == 2
    per_image = [json.loads(line) for line in (out / "scores" / "base.jsonl").read_text().splitlines()]
    assert len(per_image) == 8 and per_image[0]["ocr"] is None and per_image[4]["geneval"] is None
    assert per_image[0]["sample"] == 0 and per_image[1]["sample"] == 1

    again = tmp_path / "again"  # deterministic: the same images, so the same scores
    assert main(_args(inputs, again, f"pickscore={inputs['clip']}")) == 0
    assert json.loads((again / "table.json").read_text())["rows"]["base"]["pickscore"] == \
        table["rows"]["base"]["pickscore"]


def test_scorer_problems_exit_2_naming_the_file_before_loading(inputs: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    torn = shutil.copytree(inputs["clip"], tmp_path / "torn")
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(SystemExit) as exc:
        main(_args(inputs, tmp_path / "o", f"pickscore={torn}"))
    assert exc.value.code == 2 and f"corrupt file {torn / 'model.safetensors'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(_args(inputs, tmp_path / "o", "ocr=/no/trocr"))
    assert exc.value.code == 2 and "scorer 'ocr': weights not found: /no/trocr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(_args(inputs, tmp_path / "o", "pickscore"))
    assert exc.value.code == 2 and "expected NAME=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "o" / "table.md").exists()
