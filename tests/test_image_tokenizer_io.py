"""ImageTokenizer inputs and refusals; prepare tokenize on a folder and on webdataset shards."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_cm3leon import load_image_tokenizer
from lit_cm3leon.tokenizer.image import ImageInputError, open_image

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return load_image_tokenizer("shapes")


def _img(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    """Blocky synthetic RGB image (coarse so resampling does not dominate)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(small, np.ones((h // 4, w // 4, 1), dtype=np.uint8))


def test_package_import_does_not_import_torch():
    code = (
        "import sys, lit_cm3leon; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
        "from lit_cm3leon import load_image_tokenizer; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_encode_input_forms_agree(tok):
    arr = np.stack([_img(0), _img(1)])
    ref = tok.encode(arr)
    assert ref.shape == (2, 8, 8) and ref.dtype == torch.int64
    assert torch.equal(tok.encode(arr[0]), ref[:1])  # [H, W, 3]
    assert torch.equal(tok.encode(torch.from_numpy(arr)), ref)  # uint8 tensor
    assert torch.equal(tok.encode([Image.fromarray(a) for a in arr]), ref)  # list of PIL
    floats = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(tok.encode(floats), ref)  # float [B, 3, H, W] in [-1, 1]
    assert torch.equal(tok.encode(floats[0]), ref[:1])
    # modes are converted: grayscale equals its RGB replica; RGBA is composited on white
    gray = Image.fromarray(arr[0]).convert("L")
    assert torch.equal(tok.encode(gray), tok.encode(np.asarray(gray.convert("RGB"))))
    rgba = Image.fromarray(arr[0]).convert("RGBA")
    rgba.putalpha(0)
    assert torch.equal(tok.encode(rgba), tok.encode(np.full((32, 32, 3), 255, np.uint8)))
    cmyk = Image.fromarray(arr[0]).convert("CMYK")
    assert tok.encode(cmyk).shape == (1, 8, 8)
    assert tok.encode(Image.fromarray(arr[0]).convert("P")).shape == (1, 8, 8)


def test_resize_center_crop_and_decode_round_trip(tok):
    big = _img(2, 64, 96)  # 64x96 -> shorter side 32 -> center 32x32
    ids = tok.encode(big)
    assert ids.shape == (1, 8, 8)
    assert tok.encode(Image.fromarray(big)).shape == (1, 8, 8)
    img = tok.decode(ids)
    assert img.shape == (1, 32, 32, 3) and img.dtype == torch.uint8
    assert tok.encode(img).shape == (1, 8, 8)  # encode(decode(ids)) works
    assert tok.decode(ids[0]).shape == (1, 32, 32, 3)  # [h, w] accepted
    # batching does not change results
    many = np.stack([_img(i) for i in range(5)])
    assert torch.equal(tok.encode(many, batch_size=2), tok.encode(many))


def test_bad_inputs_have_clear_messages(tok, tmp_path):
    with pytest.raises(ImageInputError, match="at least 2x2"):
        tok.encode(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageInputError, match="at least 2x2"):
        tok.encode(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ImageInputError, match=r"in \[-1, 1\]"):
        tok.encode(torch.full((1, 3, 32, 32), 3.0))
    with pytest.raises(ImageInputError, match=r"\[B, H, W, 3\]"):
        tok.encode(np.zeros((2, 32, 32, 4), np.uint8))
    with pytest.raises(ImageInputError, match="cannot encode"):
        tok.encode("not an image")
    with pytest.raises(ImageInputError, match=r"codes must be in \[0, 2048\)"):
        tok.decode(torch.full((1, 8, 8), 2048))
    small_limit = load_image_tokenizer("shapes", max_image_pixels=1000)
    with pytest.raises(ImageInputError, match="decompression-bomb guard"):
        small_limit.encode(Image.new("RGB", (40, 40)))
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(p)
    with pytest.raises(ImageInputError, match="over the limit of 1,000"):
        open_image(p, max_pixels=1000)
    assert open_image(p).size == (100, 100)


# --------------------------------------------------------------------------------------------
# prepare tokenize
# --------------------------------------------------------------------------------------------
def _folder(root: Path) -> None:
    root.mkdir()
    for i in range(5):
        Image.fromarray(_img(i)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"caption {i}\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "broken.txt").write_text("caption of a broken file")
    Image.fromarray(_img(9)).save(root / "nocap.png")  # no caption beside it


def test_prepare_tokenize_folder_skips_counts_and_resumes(tok, tmp_path):
    from lit_cm3leon.data.pretokenize import cli

    tok_dir = tok.save(tmp_path / "tok")
    root, out = tmp_path / "imgs", tmp_path / "shards"
    _folder(root)
    argv = [
        "--source",
        "folder",
        "--root",
        str(root),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--shard-size",
        "3",
        "--fp32",
    ]
    bf16_out = tmp_path / "bf16"
    assert (
        cli([a for a in argv if a != "--fp32"] + ["--out", str(bf16_out)]) == 0
    )  # the default precision
    assert json.loads((bf16_out / "manifest.json").read_text())["precision"] == "bf16"
    assert np.load(bf16_out / "shard-00000.npz")["codes"].shape == (
        2,
        8,
        8,
    )  # broken.jpg, img0, img1
    assert cli(argv) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["count"] == 5 and man["bad"] == {"unreadable_image": 1, "empty_caption": 1}
    assert (man["h"], man["w"], man["n_codes"]) == (8, 8, 2048) and man["image_tokenizer"][
        "hash"
    ] == tok.hash
    shards = sorted(out.glob("shard-*.npz"))
    assert [s.name for s in shards] == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    z = np.load(shards[0], allow_pickle=False)
    assert z["codes"].dtype == np.int16 and z["doc_id"].dtype == np.int64
    recs = [
        json.loads(line)
        for s in sorted(out.glob("shard-*.jsonl"))
        for line in s.read_text().splitlines()
    ]
    codes = np.concatenate([np.load(s)["codes"] for s in shards])
    assert len(recs) == len(codes) == 5
    by_path = {r["path"]: (r, c) for r, c in zip(recs, codes, strict=True)}
    r, c = by_path["img3.png"]
    assert r["text"] == "caption 3"
    assert np.array_equal(c, tok.encode(_img(3))[0].numpy())

    # resume: finished shards are skipped, a missing one is rebuilt identically
    before = {s.name: s.stat().st_mtime_ns for s in shards}
    lost = np.load(shards[1])["codes"].copy()
    shards[1].unlink()
    assert cli(argv) == 0
    assert shards[0].stat().st_mtime_ns == before["shard-00000.npz"]
    assert np.array_equal(np.load(shards[1])["codes"], lost)
    assert json.loads((out / "manifest.json").read_text())["bad"] == man["bad"]


def _tar(path: Path, samples: list[tuple[str, bytes | None, str]], truncate: bool = False) -> None:
    with tarfile.open(path, "w") as tf:
        for key, img, text in samples:
            for ext, data in (
                ("jpg", img),
                ("txt", text.encode()),
                ("json", json.dumps({"url": f"http://x/{key}"}).encode()),
            ):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_img(seed)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_prepare_tokenize_webdataset_shards(tok, tmp_path):
    from lit_cm3leon.data.pretokenize import cli

    d = tmp_path / "wds"
    d.mkdir()
    _tar(
        d / "00000.tar",
        [
            ("000000000", _jpg(0), "a red thing"),
            ("000000001", b"garbage", "bad"),
            ("000000002", _jpg(2), ""),
        ],
    )
    _tar(
        d / "00001.tar",
        [("000010000", _jpg(3), "a blue thing")] * 1 + [("000010001", _jpg(4), "x" * 40000)],
        truncate=True,
    )
    out = tmp_path / "out"
    assert (
        cli(
            [
                "--source",
                "wds",
                "--shards",
                str(d / "*.tar"),
                "--tokenizer",
                "shapes",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    man = json.loads((out / "manifest.json").read_text())
    assert man["bad"]["unreadable_image"] == 1 and man["bad"]["empty_caption"] == 1
    assert man["bad"]["truncated_shards"] == 1
    recs = [json.loads(x) for x in (out / "shard-00000.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == ["a red thing"] and recs[0]["url"] == "http://x/000000000"
    assert recs[0]["doc_id"] == 0
    assert man["count"] == len(recs) + len((out / "shard-00001.jsonl").read_text().splitlines())


def test_prepare_tokenize_shapes_parallel(tok, tmp_path):
    shapes = pytest.importorskip("lit_cm3leon.data.shapes")
    from lit_cm3leon.data.pretokenize import cli

    tok_dir = tok.save(tmp_path / "tok")
    out = tmp_path / "shapes"
    argv = [
        "--source",
        "shapes",
        "--split",
        "heldout",
        "--n",
        "10",
        "--shard-size",
        "4",
        "--workers",
        "2",
        "--fp32",
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["count"] == 10 and len(man["shards"]) == 3 and man["bad"] == {}
    recs = [
        json.loads(x) for s in sorted(out.glob("shard-*.jsonl")) for x in s.read_text().splitlines()
    ]
    world = shapes.ShapesWorld()
    s7 = world.sample("heldout", 7)
    assert recs[7]["doc_id"] == 7 and recs[7]["text"] == s7.caption_short
    codes = np.concatenate([np.load(p)["codes"] for p in sorted(out.glob("shard-*.npz"))])
    assert np.array_equal(
        codes[7], tok.encode(s7.image)[0].numpy()
    )  # workers match in-process encoding


def test_prepare_tokenize_adds_landmark_views_that_rerender(tok, tmp_path):
    """--landmark-views appends named views after the --n samples (doc ids from 10**8); shard
    records carry what re-renders them, for the memory bank's embedding."""
    from lit_cm3leon.data.pretokenize import LANDMARK_DOC_BASE, cli
    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.data.shards import TokenShards
    from lit_cm3leon.retrieval.bank_docs import shard_images

    out = tmp_path / "shapes"
    argv = ["--source", "shapes", "--n", "3", "--landmark-views", "4", "--landmarks", "2"]
    argv += ["--caption", "long", "--tokenizer", str(tok.save(tmp_path / "tok")), "--out", str(out)]
    assert cli(argv) == 0
    shards = TokenShards(out)
    assert list(shards.doc_ids) == [0, 1, 2, *(LANDMARK_DOC_BASE + i for i in range(4))]
    view = ShapesWorld().landmark_sample("train", 2, 2)
    row = shards.row_of[LANDMARK_DOC_BASE + 2]
    assert shards.text(row) == view.caption_long and shards.records[row]["landmarks"] == 2
    np.testing.assert_array_equal(shard_images(shards, [row])[0], view.image)
    np.testing.assert_array_equal(shards.codes[row], tok.encode(view.image, bf16=True)[0].numpy())
    with pytest.raises(SystemExit):  # neither samples nor landmark views
        cli(["--source", "shapes", "--n", "0", "--out", str(tmp_path / "x")])
    assert cli(argv) == 0  # the same arguments again: every shard is finished and kept
    more = [a if a != "4" else "6" for a in argv]  # more views: shard 1 would hold other records
    with pytest.raises(ValueError, match=r"shard-00001.npz was written by another tokenize job"):
        cli(more)


def test_shapes_shards_rerender_in_their_own_world(tok, tmp_path):
    # Retrieval re-renders shapes records from (split, index) to embed them: the world is the
    # one the shards were written from (here 40 px, world seed 3), not the default one.
    from lit_cm3leon.data.pretokenize import cli
    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.data.shards import TokenShards
    from lit_cm3leon.retrieval.bank_docs import shard_images

    tok_dir = tok.save(tmp_path / "tok")
    out = tmp_path / "shapes40"
    argv = ["--source", "shapes", "--n", "4", "--image-size", "40", "--world-seed", "3"]
    assert cli([*argv, "--fp32", "--tokenizer", str(tok_dir), "--out", str(out)]) == 0
    images = shard_images(TokenShards(out), [1, 3])
    world = ShapesWorld(image_size=40, seed=3)
    assert images.shape == (2, 40, 40, 3)
    assert np.array_equal(images[1], world.sample("train", 3).image)
    # a world with aligned cells is recorded in the manifest and re-rendered from it
    aligned = tmp_path / "aligned"
    assert (
        cli(
            [
                *argv,
                "--cell-align",
                "4",
                "--fp32",
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(aligned),
            ]
        )
        == 0
    )
    world = TokenShards(aligned).shapes_world()
    assert (world.cell_align, world.image_size, world.seed) == (4, 40, 3)
    assert np.array_equal(
        shard_images(TokenShards(aligned), [3])[0], world.sample("train", 3).image
    )
    assert TokenShards(out).shapes_world().cell_align == 1
