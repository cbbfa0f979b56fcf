"""eval/tables.py puts each metrics.json in its table, beside the paper's figures, labelled."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import tables  # noqa: E402

from lit_cm3leon.evaluation.metrics_io import InputError, run_header, write_metrics  # noqa: E402
from lit_cm3leon.evaluation.paper import TABLE1, TABLE2  # noqa: E402


def test_tables_from_metrics(tmp_path, capsys):
    fid = write_metrics(tmp_path / "fid.json", run_header("shapes-v1", 0, 1000, ckpt="pretrain/last.ckpt", retrieve_k=2),
                        {"fid": 12.345, "features": "clip", "metric": "FID-CLIP"}, {"fid": [11.0, 13.5]}, {})  # fmt: skip
    cap = write_metrics(tmp_path / "cap.json", run_header("coco-captions", 0, 500, ckpt="sft/last.ckpt"),
                        {"CIDEr": 0.4567, "Bleu_4": 0.1}, {"CIDEr": [0.40, 0.50]}, {})  # fmt: skip
    vqa = write_metrics(tmp_path / "vqa.json", run_header("shapes-vqa", 0, 1000, ckpt="sft/last.ckpt"),
                        {"overall": 71.25, "perAnswerType": {"other": 71.25}}, {}, {})  # fmt: skip
    assert fid["n"] == 1000 and cap["ckpt"] == "sft/last.ckpt" and vqa["retrieve_k"] is None
    out = tmp_path / "tables.md"
    assert (
        tables.main(
            [str(tmp_path / n) for n in ("fid.json", "cap.json", "vqa.json")] + ["--out", str(out)]
        )
        == 0
    )
    md = out.read_text()
    assert md == capsys.readouterr().out
    for row in TABLE1:
        assert f"| {row['retrieve_k']} | FID | {row['fid']:.2f} |" in md
    assert (
        "| ours | pretrain/last.ckpt | shapes-v1 | 2 | FID-CLIP | 12.35 | [11.00, 13.50] | 1000 |"
        in md
    )
    assert f"| {TABLE2['MS-COCO CIDEr']:.1f} |" in md
    # CIDEr printed x 100 like the paper; an unknown VQA protocol gets a column of its own
    assert "| ours | sft/last.ckpt | 45.7 [40.0, 50.0] | – | – | – | 71.2 |" in md
    assert "shapes-vqa acc." in md


def test_not_a_metrics_file(tmp_path):
    (tmp_path / "x.json").write_text('{"fid": 1}')
    with pytest.raises(InputError, match="missing"):
        tables.build([str(tmp_path / "x.json")])


def test_report_rerank_row_is_the_ablations_8_sample_run(tmp_path):
    """The report's '8 samples + CLIP re-rank' row reads the ablation's cfg_topp run of the
    ``shapes`` model with 8 samples, not another strategy, size or sample count."""
    import csv
    import json

    from lit_cm3leon.report import Report

    out = tmp_path / "outputs"
    ablation = out / "eval" / "ablation" / "shapes"
    ablation.mkdir(parents=True)
    runs = [("shapes", "cfg_topp", 8, 0.111), ("shapes", "mixed", 8, 0.222),
            ("shapes_small", "cfg_topp", 8, 0.333), ("shapes", "cfg_topp", 4, 0.444)]  # fmt: skip
    with (ablation / "figure4.csv").open("w", newline="") as f:
        w = csv.DictWriter(
            f, ["panel", "size", "strategy", "cfg_scale", "num_samples", "fid", "run_dir"]
        )
        w.writeheader()
        for i, (size, strategy, s, fid) in enumerate(runs):
            run = out / "eval" / "t2i" / f"run{i}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"fid": fid, "clip_score": 50.0, "n": 40}))
            # absolute folders as the ablation writes them, from another location of outputs/
            w.writerow({"panel": "samples", "size": size, "strategy": strategy, "cfg_scale": 3.0,
                        "num_samples": s, "fid": fid, "run_dir": f"/elsewhere/eval/t2i/run{i}"})  # fmt: skip
    text = Report(out).build()
    row = next(line for line in text.splitlines() if "8 samples + CLIP re-rank" in line)
    assert row.startswith(
        "| cfg_scale 3, 8 samples + CLIP re-rank (the ablation's run) | 0.111 | 50.00 |"
    )
    assert Report(tmp_path / "none").ablation_run("cfg_topp", 8) is None


def test_report_caption_reading_rows_and_the_unread_caption_note(tmp_path):
    """The report's caption-probe table reads eval/caption_probe_<model>/metrics.json, and says
    so when the pretrained decoder does not read the caption (background delta near 0)."""
    from lit_cm3leon.report import Report

    out = tmp_path / "outputs"
    deltas = {"colour": 0.192, "kind": 0.005, "position": 0.871, "background": 4.056,
              "other_scene": 4.822}  # fmt: skip
    for model, scale in (("pretrain", 1.0), ("sft", 0.01)):
        write_metrics(out / "eval" / f"caption_probe_{model}" / "metrics.json",
                      run_header("shapes-caption-probe", 0, 300, ckpt=model),
                      {f"delta_{k}": v * scale for k, v in deltas.items()},
                      {f"delta_{k}": [v * scale - 0.1, v * scale + 0.1] for k, v in deltas.items()},
                      {})  # fmt: skip
    lines = Report(out).build().splitlines()
    head = lines.index("| model | colour | kind | position | background | other scene | n |")
    assert lines[head + 2] == (
        "| pretrain | 0.192 [0.092, 0.292] | 0.005 [-0.095, 0.105] | 0.871 [0.771, 0.971] | "
        "4.056 [3.956, 4.156] | 4.822 [4.722, 4.922] | 300 |"
    )
    assert lines[head + 3].startswith("| sft | 0.002 [-0.098, 0.102] | 0.000 ")
    assert not any("hardly reads the caption" in line for line in lines)

    write_metrics(out / "eval" / "caption_probe_pretrain" / "metrics.json",
                  run_header("shapes-caption-probe", 0, 300, ckpt="pretrain"),
                  {"delta_background": 0.05}, {}, {})  # fmt: skip
    text = Report(out).build()
    assert "hardly reads the caption (background 0.050 nats" in text
    assert "| pretrain | – | – | – | 0.050 – | – | 300 |" in text
    assert "| pretrain | not run |" in Report(tmp_path / "none").build()


def ci_vqa(out):
    from lit_cm3leon.evaluation.bootstrap import versus

    run = out / "eval"
    return versus(run / "vqa_sft" / "run", run / "vqa_pretrain" / "run", 300, 0, 100.0)[1][
        "difference_overall"
    ]


def test_report_compares_sft_with_pretrain_on_the_same_items(tmp_path):
    """Table 2's "sft minus pretrain" row and finding 4 pair the two runs' per-item scores:
    a clear win needs both intervals above 0; runs over other items are not compared."""
    from lit_cm3leon.evaluation.bootstrap import versus
    from lit_cm3leon.evaluation.metrics_io import write_item_scores
    from lit_cm3leon.report import Report

    out = tmp_path / "outputs"
    rng = np.random.default_rng(0)
    hard = rng.random(200)  # items vary together for both models
    scores = {
        "captioning": {"pretrain": {"CIDEr": hard, "caption_attr_acc": hard / 2},
                       "sft": {"CIDEr": hard + 0.3 + 0.05 * rng.standard_normal(200),
                               "caption_attr_acc": hard / 2 + 0.01 * rng.standard_normal(200)}},
        "vqa": {"pretrain": {"overall": (hard > 0.7).astype(float)},
                "sft": {"overall": (hard > 0.4).astype(float)}},
    }  # fmt: skip
    for name, by_model in scores.items():
        for m, per in by_model.items():
            run = out / "eval" / f"{name}_{m}" / "run"
            run.mkdir(parents=True)
            write_item_scores(run, np.arange(200), per)
            means = {k: float(np.mean(v)) * (100 if name == "vqa" else 1) for k, v in per.items()}
            write_metrics(out / "eval" / f"{name}_{m}" / "metrics.json",
                          run_header("x", 0, 200, ckpt=m), means, {}, {"resamples": 300, "seed": 0})  # fmt: skip
    points, ci = versus(
        out / "eval" / "captioning_sft" / "run", out / "eval" / "captioning_pretrain" / "run", 300
    )
    assert points["difference_CIDEr"] == pytest.approx(
        np.mean(scores["captioning"]["sft"]["CIDEr"] - hard)
    )
    assert (
        0.28
        < ci["difference_CIDEr"][0]
        < points["difference_CIDEr"]
        < ci["difference_CIDEr"][1]
        < 0.32
    )
    lo, hi = ci["difference_caption_attr_acc"]
    assert lo < 0 < hi  # no gain: the interval straddles 0
    text = Report(out).build()
    row = next(line for line in text.splitlines() if "sft minus pretrain" in line)
    assert f"{points['difference_CIDEr']:.3f} [{ci['difference_CIDEr'][0]:.3f}" in row
    gain = 100 * np.mean((hard > 0.4) & (hard <= 0.7))  # VQA, in points
    assert row.endswith(f" | {gain:.2f} [{ci_vqa(out)[0]:.2f}, {ci_vqa(out)[1]:.2f}] |")
    assert "4. SFT lifts VQA and captioning over the pretrained model: **reproduced**" in text
    assert "(paired differences" in text
    # a pretrained run over other items: refused by versus, not compared in the report
    write_item_scores(
        out / "eval" / "vqa_pretrain" / "run", np.arange(1, 201), scores["vqa"]["pretrain"]
    )
    with pytest.raises(InputError, match="scored different items"):
        versus(out / "eval" / "vqa_sft" / "run", out / "eval" / "vqa_pretrain" / "run")
    lines = Report(out).build().splitlines()
    row = next(i for i, line in enumerate(lines) if "sft minus pretrain" in line)
    assert lines[row].endswith("| – |")  # the VQA cell; the table goes on unbroken
    assert lines[row - 1].startswith("| ours, shapes | sft minus the baseline")
    assert any(line.startswith("vqa: sft and pretrain not compared:") for line in lines[row:])
    assert not any("(paired differences" in line for line in lines)
