"""The ``--ckpt`` modes of the eval scripts and the decoding ablation, end to end on fixture
artifacts built here: a text tokenizer, a fresh shapes image tokenizer, a fresh debug decoder and
two tiny fresh CLIPs (retriever and evaluation CLIP)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import make_tiny_outputs

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = (
    "protocol",
    "seed",
    "ckpt",
    "strategy",
    "cfg_scale",
    "num_samples",
    "retrieve_k",
    "n",
    "ci95",
    "bootstrap",
)


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", ROOT / "eval" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Same numerics in this process and the child (and no oversubscription on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return make_tiny_outputs(tmp_path_factory.mktemp("ckpt") / "outputs")


def fid_args(out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(out / "pretrain"), "--outputs", str(out), "--n", "4", "--chunk", "2",
            "--bootstrap", "10", "--no-progress", *extra]  # fmt: skip


def metric_values(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("run_dir",)}


@pytest.fixture(scope="module")
def clean(outputs):
    """A clean --ckpt run into the default folder (named after its settings): its metrics."""
    assert script("coco_fid").main(fid_args(outputs)) == 0
    folder = outputs / "eval" / "t2i" / "pretrain_shapes-heldout_n4_cfg_topp_cfg3_s1_k0_seed0"
    return folder, json.loads((folder / "metrics.json").read_text())


def test_coco_fid_ckpt_resume_and_determinism(outputs, clean, tmp_path):
    coco_fid = script("coco_fid")
    folder, clean = clean
    runs = outputs / "eval" / "t2i"
    for key in (*SCHEMA, "fid", "features", "metric", "clip_score", "attr_acc", "exact"):
        assert key in clean, key
    assert clean["metric"] == "FID-CLIP" and clean["n"] == 4 and clean["ckpt"].endswith("pretrain")
    assert set(clean["ci95"]) >= {"fid", "clip_score", "attr_acc", "exact"}
    assert 0.0 <= clean["attr_acc"] <= 1.0 and np.isfinite(clean["fid"])
    assert len(list((folder / "samples").glob("*.png"))) == 4
    (reference,) = (runs / "reference").glob("shapes-heldout-n4-*")
    assert len(list(reference.glob("*.png"))) == 4
    # a finished run is reported again, not regenerated
    stamp = {p.name: p.stat().st_mtime_ns for p in (folder / "samples").glob("*.png")}
    assert coco_fid.main(fid_args(outputs)) == 0
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (folder / "samples").glob("*.png")}

    # 2. the same settings into another folder give the same metrics (seeded)
    again = tmp_path / "again"
    assert coco_fid.main(fid_args(outputs, "--run-dir", str(again))) == 0
    assert metric_values(json.loads((again / "metrics.json").read_text())) == metric_values(clean)

    # 3. killed after its first chunk, then resumed: finished chunks are kept, metrics are a clean run's
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval" / "coco_fid.py"), *fid_args(outputs, "--run-dir", str(killed))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = [killed / "samples" / f"{i:05d}.png" for i in (0, 1)]
    deadline = time.time() + 120
    while not all(p.is_file() for p in first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert all(p.is_file() for p in first), "the child never finished its first chunk"
    assert not (killed / "metrics.json").is_file(), "the child finished before it was killed"
    kept = {p: p.stat().st_mtime_ns for p in first}
    assert coco_fid.main(fid_args(outputs, "--run-dir", str(killed))) == 0
    assert kept == {p: p.stat().st_mtime_ns for p in first}
    assert metric_values(json.loads((killed / "metrics.json").read_text())) == metric_values(clean)


def test_run_folder_of_another_checkpoint_is_refused(outputs, tmp_path):
    from lit_cm3leon.evaluation.metrics_io import InputError
    from lit_cm3leon.evaluation.t2i_run import RunSpec

    RunSpec("a", "digest1", "shapes-heldout", 4, 0, 2, {"strategy": "cfg_topp"}).check_against(
        tmp_path
    )
    RunSpec(
        "moved/a", "digest1", "shapes-heldout", 4, 0, 2, {"strategy": "cfg_topp"}
    ).check_against(tmp_path)
    with pytest.raises(InputError, match="ckpt_digest"):
        RunSpec("a", "digest2", "shapes-heldout", 4, 0, 2, {"strategy": "cfg_topp"}).check_against(
            tmp_path
        )


def test_prefix_helpers():
    from lit_cm3leon.evaluation.t2i_run import best_of_prefix, interleave

    a = np.arange(6).reshape(1, 3, 2) * 10  # [n=1, K=3, ...]
    b = a + 1
    mixed = interleave(a, b)
    assert mixed.shape == (1, 6, 2) and mixed[0, :, 0].tolist() == [0, 1, 20, 21, 40, 41]
    scores = np.array([[0.1, 0.5, 0.5, 0.9]])
    assert best_of_prefix(scores, 1).tolist() == [0]
    assert best_of_prefix(scores, 3).tolist() == [1]  # ties keep the earlier candidate
    assert best_of_prefix(scores, 4).tolist() == [3]


def test_caption_claim_accuracy():
    from lit_cm3leon.data.shapes import Scene, Shape
    from lit_cm3leon.evaluation.shapes_i2t import caption_attr_scores

    scene = Scene(
        "white", (Shape("circle", "red", "large", 0, 0), Shape("square", "blue", "small", 1, 1))
    )
    preds = {
        0: "a large red circle at the top left and a green square",
        1: "",
        2: "a red circle and a blue square",
    }
    s = caption_attr_scores(preds, {0: scene, 1: scene, 2: scene})
    assert s["caption_attr_precision"].tolist() == [0.5, 0.0, 1.0]
    assert s["caption_attr_recall"].tolist() == [0.5, 0.0, 1.0]
    assert s["caption_attr_acc"].tolist() == [0.5, 0.0, 1.0]


def test_captioning_and_vqa_ckpt(outputs):
    from lit_cm3leon.evaluation.metrics_io import read_item_scores, read_metrics
    from lit_cm3leon.evaluation.vqa_accuracy import load_vqa

    common = ["--ckpt", str(outputs / "pretrain"), "--outputs", str(outputs), "--bootstrap", "10",
              "--baseline-train", "300"]  # fmt: skip
    assert (
        script("captioning").main(
            [*common, "--n", "3", "--max-text-tokens", "8", "--metrics", "Bleu_4,CIDEr"]
        )
        == 0
    )
    cap = outputs / "eval" / "captioning" / "pretrain_shapes-heldout_n3_caption_long_greedy_seed0"
    preds = json.loads((cap / "predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [0, 1, 2] and all(
        isinstance(p["caption"], str) for p in preds
    )
    anns = json.loads((cap / "annotations.json").read_text())
    assert len(anns["images"]) == 3 and len(anns["annotations"]) == 6
    m = read_metrics(cap / "metrics.json")
    assert m["protocol"] == "shapes-captions" and m["strategy"] == "greedy" and m["n"] == 3
    for key in (
        "Bleu_4",
        "CIDEr",
        "caption_attr_acc",
        "baseline_Bleu_4",
        "baseline_CIDEr",
        "baseline_caption_attr_acc",
    ):
        assert key in m and key in m["ci95"], key
    assert isinstance(m["baseline_caption"], str) and m["baseline_caption"].endswith("background")
    # an untrained decoder's captions are no better than the most frequent caption
    assert m["baseline_Bleu_4"] >= m["Bleu_4"]
    # paired differences of the scores that average over images (BLEU does not)
    assert "difference_Bleu_4" not in m
    for key in ("CIDEr", "caption_attr_acc"):
        assert m[f"difference_{key}"] == pytest.approx(m[key] - m[f"baseline_{key}"]), key
        assert f"difference_{key}" in m["ci95"], key
    # the per-image scores behind the means, for comparing two models on the same images
    ids, per = read_item_scores(cap)
    assert ids == [0, 1, 2] and set(per) == {"CIDEr", "caption_attr_acc"}  # --metrics asked
    for key in ("CIDEr", "caption_attr_acc"):
        assert np.mean(per[key]) == pytest.approx(m[key]), key

    assert script("vqa").main([*common, "--n", "8"]) == 0
    vq = outputs / "eval" / "vqa" / "pretrain_shapes-heldout_n8_vqa_greedy_seed0"
    _, annotations = load_vqa(vq / "results.json", vq / "questions.json", vq / "annotations.json")
    assert len(annotations) == 8 and all(len(a["answers"]) == 10 for a in annotations)
    assert {a["answer_type"] for a in annotations} <= {"yes/no", "number", "other"}
    m = read_metrics(vq / "metrics.json")
    assert m["protocol"] == "shapes-vqa" and "perQuestionType" in m
    assert set(m["baseline_prior"]) == {"color", "shape", "count", "position", "yesno"}
    assert "baseline_overall" in m and "overall" in m["ci95"] and "baseline_overall" in m["ci95"]
    assert m["difference_overall"] == pytest.approx(m["overall"] - m["baseline_overall"], abs=0.01)
    ids, per = read_item_scores(vq)
    assert ids == [a["question_id"] for a in annotations]
    assert 100 * np.mean(per["overall"]) == pytest.approx(m["overall"], abs=0.01)
    lo, hi = m["ci95"]["difference_overall"]
    assert lo <= m["difference_overall"] <= hi
    # the prior baseline is scored with the official metric: its yes/no accuracy is that of
    # always answering its prior's yes/no answer
    yn = [a for a in annotations if a["answer_type"] == "yes/no"]
    expect = 100 * np.mean([a["answers"][0]["answer"] == m["baseline_prior"]["yesno"] for a in yn])
    assert m["baseline_perAnswerType"]["yes/no"] == pytest.approx(expect, abs=0.01)
    # Table 2 shows our rows and each baseline row
    md = script("tables").build([str(cap / "metrics.json"), str(vq / "metrics.json")])
    assert "shapes-captions CIDEr" in md and "shapes-vqa acc." in md
    row = next(line for line in md.splitlines() if "question-only answer prior" in line)
    assert f"{m['baseline_overall']:.1f}" in row
    assert "most frequent training caption" in md


def test_ablation_tiny_grid(outputs):
    ablate = script("ablate_decoding")
    args = ["ablation=shapes", f"outputs={outputs}", f"ckpts=[debug={outputs / 'pretrain'}]", "n=4", "chunk=2",
            "cfg_scales=[1,3]", "samples=[1,2]", "strategies=[cfg_topp,mixed]", "bootstrap=5", "--no-progress"]  # fmt: skip
    assert ablate.main(args) == 0
    out = outputs / "eval" / "ablation" / "shapes"
    rows = (out / "figure4.csv").read_text().splitlines()
    assert rows[0].startswith("panel,size,strategy,cfg_scale,num_samples")
    assert len(rows) == 1 + 2 + 2 * 2  # 2 CFG cells, 2 strategies x 2 sample counts
    md = (out / "figure4.md").read_text()
    assert "against CFG scale" in md and "against samples" in md and "Figure 4" in md
    assert (out / "figure4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the CFG axis reaches the decoder: guidance changes the samples
    runs = outputs / "eval" / "t2i"
    cfg1, cfg3 = (runs / f"pretrain_shapes-heldout_n4_cfg_topp_cfg{s}_s1_k0_seed0" for s in (1, 3))
    assert any((cfg1 / "samples" / f"{i:05d}.png").read_bytes() != (cfg3 / "samples" / f"{i:05d}.png").read_bytes()
               for i in range(4))  # fmt: skip
    # re-ranking the first 2 of 2 candidates is exactly a 2-sample run of coco_fid (same seed, chunks)
    prefix = runs / "pretrain_shapes-heldout_n4_cfg_topp_cfg3_s2_k0_seed0_prefix2"
    assert script("coco_fid").main(["--ckpt", str(outputs / "pretrain"), "--outputs", str(outputs), "--n", "4",
                                    "--chunk", "2", "--num-samples", "2", "--bootstrap", "5", "--no-progress"]) == 0  # fmt: skip
    direct = runs / "pretrain_shapes-heldout_n4_cfg_topp_cfg3_s2_k0_seed0"
    for i in range(4):
        a = np.asarray(Image.open(prefix / "samples" / f"{i:05d}.png"))
        b = np.asarray(Image.open(direct / "samples" / f"{i:05d}.png"))
        assert np.array_equal(a, b), i
    # a rerun reuses every finished cell
    stamp = (prefix / "metrics.json").stat().st_mtime_ns
    assert ablate.main(args) == 0
    assert (prefix / "metrics.json").stat().st_mtime_ns == stamp


def test_rank_sharding_scores_once_all_samples_exist(outputs, clean, tmp_path):
    coco_fid = script("coco_fid")
    run = tmp_path / "sharded"
    assert (
        coco_fid.main(fid_args(outputs, "--run-dir", str(run), "--rank", "0", "--world-size", "2"))
        == 0
    )
    made = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert made == ["00000.png", "00001.png"]  # chunk 0 of 2
    assert not (run / "metrics.json").is_file()
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "1", "2"
    try:
        assert coco_fid.main(fid_args(outputs, "--run-dir", str(run))) == 0
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert metric_values(json.loads((run / "metrics.json").read_text())) == metric_values(clean[1])


def test_coco_captions_prompts(outputs, tmp_path):
    coco_fid = script("coco_fid")
    from lit_cm3leon.data.shapes import ShapesWorld

    world, ref = ShapesWorld(), tmp_path / "val"
    ref.mkdir()
    images, annotations = [], []
    for i in range(4):
        s = world.sample("train", i)
        Image.fromarray(s.image).save(ref / f"{i:012d}.jpg", quality=95)
        images.append({"id": 100 + i, "file_name": f"{i:012d}.jpg"})
        annotations += [{"id": 2 * i, "image_id": 100 + i, "caption": s.caption_long},
                        {"id": 2 * i + 1, "image_id": 100 + i, "caption": s.caption_short}]  # fmt: skip
    captions = tmp_path / "captions_val.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    base = fid_args(outputs, "--n", "4", "--captions", str(captions))
    assert coco_fid.main(base) == 2  # needs --reference
    assert (
        coco_fid.main(
            [
                *base,
                "--reference",
                str(ref),
                "--features",
                "clip",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["protocol"] == "coco-captions_val" and "attr_acc" not in m and "clip_score" in m
    prompts = json.loads((tmp_path / "run" / "prompts.json").read_text())
    assert (
        prompts["00001.png"] == world.sample("train", 1).caption_long
    )  # the first caption of each image


def test_engine_mixed_splits_each_prompts_samples(monkeypatch):
    from lit_cm3leon import engine as engine_mod

    calls = []

    def fake_generate(model, prompts, vocab, n, strategy, **kw):
        calls.append((strategy, len(prompts)))
        return [[vocab.image_offset] * vocab.image_tokens for _ in prompts]

    class Codec:
        class vocab:  # noqa: N801 - a stand-in namespace
            image_h = image_w = 2
            image_tokens = 4
            image_offset = 10
            bos, brk = 1, 2

            @staticmethod
            def mask(i):
                return 3

            @staticmethod
            def is_image(t):
                return t >= 10

        @staticmethod
        def encode(doc):
            return [5]

    monkeypatch.setattr(engine_mod, "generate", fake_generate)
    eng = engine_mod.Engine(torch.nn.Linear(1, 1), Codec())
    eng.text_to_image_codes(
        ["a", "b"], engine_mod.Decoding(strategy="mixed", num_samples=3), batch_size=64
    )
    assert calls == [("cfg_topp", 4), ("cdk", 2)]  # samples 0-1 of each prompt, then sample 2
    calls.clear()
    eng.text_to_image_codes(
        ["a", "b"], engine_mod.Decoding(strategy="cdk", num_samples=3), batch_size=64
    )
    assert calls == [("cdk", 6)]


def test_scoring_an_oracle_run(outputs, tmp_path):
    """Samples equal to the references: FID-CLIP ~ 0, every scene parsed right, and the
    attribute scores follow the prompt order (one swapped sample is caught)."""
    from lit_cm3leon.evaluation import t2i_run as tr
    from lit_cm3leon.evaluation.fid import load_clip_encoder

    pset = tr.prompt_set(6, outputs)
    folder = tmp_path / "oracle"
    refs = [np.asarray(Image.open(pset.reference / f"{i:05d}.png")) for i in range(6)]
    tr.write_images(folder / "samples", np.stack(refs))
    spec = tr.RunSpec("oracle", "-", pset.protocol, 6, 0, 2, {})
    dec = type("D", (), {"strategy": None, "cfg_scale": None, "num_samples": 1, "retrieve_k": 0})
    scorers = tr.Scorers("clip", load_clip_encoder(outputs / "eval_clip"))
    rec = tr.score_run(
        folder, pset.prompts, pset.reference, tr.header_for(spec, dec), scorers, pset.scenes, 5, 0
    )
    assert (
        rec["fid"] == pytest.approx(0.0, abs=1e-3)
        and rec["attr_acc"] == 1.0
        and rec["exact"] == 1.0
    )
    assert rec["count_acc"] == 1.0
    (folder / "metrics.json").unlink()
    swapped = np.stack([refs[1], refs[0], *refs[2:]])
    for p in (folder / "samples").glob("*.png"):
        p.unlink()
    tr.write_images(folder / "samples", swapped)
    rec = tr.score_run(
        folder, pset.prompts, pset.reference, tr.header_for(spec, dec), scorers, pset.scenes, 5, 0
    )
    assert rec["exact"] == pytest.approx(4 / 6) and rec["fid"] == pytest.approx(0.0, abs=1e-3)


def test_reference_pngs_are_keyed_by_their_pixels(tmp_path):
    """Scenes of another world (same n) get their own reference folder: the earlier PNGs,
    which ``write_images`` would otherwise skip as already written, are never reused."""
    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.evaluation import t2i_run as tr
    from lit_cm3leon.evaluation.t2i import shapes_protocol

    _, _, default = shapes_protocol(3, ShapesWorld())
    _, _, aligned = shapes_protocol(3, ShapesWorld(cell_align=4))
    assert not np.array_equal(default, aligned)
    a = tr.shapes_reference(tmp_path, default)
    b = tr.shapes_reference(tmp_path, aligned)
    assert a != b and a.name.startswith("shapes-heldout-n3-")
    assert tr.shapes_reference(tmp_path, default) == a  # the same scenes share one folder
    for folder, images in ((a, default), (b, aligned)):
        written = np.stack([np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(3)])
        assert np.array_equal(written, images)
