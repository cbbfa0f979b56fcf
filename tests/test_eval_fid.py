"""FID parity with clean-fid on small PNG folders, FID-CLIP / CLIP score through the CLI, and
the Inception weights handling (a stand-in TorchScript file with clean-fid's layout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import coco_fid  # noqa: E402

from lit_cm3leon.evaluation import fid as fidlib  # noqa: E402
from lit_cm3leon.evaluation.metrics_io import InputError  # noqa: E402

torch.set_num_threads(1)


def _write_pngs(folder: Path, n: int, seed: int, size: int = 32, shift: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.uniform(0, 255, (4, 4, 3))
        img = np.kron(base, np.ones((size // 4, size // 4, 1))) + rng.normal(
            shift, 20, (size, size, 3)
        )
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


class TinyNet(torch.nn.Module):
    """A fixed random conv net: 299px images -> 16 features."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 13, stride=13)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.01)
            self.conv.bias.zero_()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x / 255)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fid")
    _write_pngs(root / "a", 20, seed=1)
    _write_pngs(root / "b", 20, seed=2, shift=25.0)
    return root / "a", root / "b"


def test_same_folder_is_zero(folders):
    a, _ = folders
    res = fidlib.score_fid(a, a, TinyNet(), n_bootstrap=0)
    assert res.n_samples == res.n_reference == 20
    assert abs(res.fid) < 1e-6


def test_equals_clean_fid(folders):
    from cleanfid import fid as cleanfid

    a, b = folders
    net = TinyNet()
    ref = cleanfid.compute_fid(str(a), str(b), mode="clean", custom_feat_extractor=net, num_workers=0,
                               device=torch.device("cpu"), verbose=False)  # fmt: skip
    res = fidlib.score_fid(a, b, net, n_bootstrap=20, seed=0)
    assert res.fid > 1e-3
    assert res.fid == pytest.approx(ref, rel=1e-9, abs=1e-9)
    lo, hi = res.ci95
    assert lo <= hi and hi > 0
    # same seed, same interval
    assert fidlib.score_fid(a, b, net, n_bootstrap=20, seed=0).ci95 == res.ci95


@pytest.mark.parametrize("n", [20, 300])  # fewer images than dimensions (rank-deficient), more
def test_bootstrap_frechet_distance_equals_clean_fids(n):
    # The bootstrap's eigendecomposition form against clean-fid's sqrtm form of the same distance.
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 128))
    b = rng.normal(size=(n, 128)) @ rng.normal(size=(128, 128)) * 0.2 + 0.1
    theirs = fidlib.fid_from_features(a, b)
    assert fidlib.frechet_distance_eigh(a, b) == pytest.approx(theirs, rel=1e-6)
    assert fidlib.frechet_distance_eigh(a, a) == pytest.approx(0, abs=1e-4)
    lo, hi = fidlib.bootstrap_fid(a, b, 50, seed=0)
    assert 0 < lo < hi and hi < 3 * theirs


def test_inception_weights_local_file_matches_clean_fid_wrapper(tmp_path):
    """A stand-in with clean-fid's TorchScript layout (`.layers` -> [B,2048,1,1]) loaded from an
    explicit path gives the features of clean-fid's own InceptionV3W wrapper."""
    from cleanfid.inception_torchscript import InceptionV3W

    class Base(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = torch.nn.Sequential(
                torch.nn.AdaptiveAvgPool2d(2), torch.nn.Conv2d(3, 2048, 2)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Base()).save(str(path))
    x = torch.rand(3, 3, 299, 299) * 255
    ours = fidlib.inception_extractor(path)(x)
    theirs = InceptionV3W(str(tmp_path), download=False)(x)
    assert ours.shape == (3, 2048)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="299x299"):
        fidlib.inception_extractor(path)(x[:, :, :64, :64])


def test_missing_inception_weights_says_where(folders, tmp_path, capsys):
    a, b = folders
    with pytest.raises(InputError, match="inception-2015-12-05.pt"):
        fidlib.inception_extractor(tmp_path / "nope.pt")
    rc = coco_fid.main(["--samples", str(a), "--reference", str(b), "--inception-weights", str(tmp_path / "nope.pt"),
                        "--out", str(tmp_path / "m.json")])  # fmt: skip
    assert rc == 2 and "--inception-weights" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        fidlib.list_images(tmp_path / "empty")


class FakeClip:
    """Stands in for ClipEncoder: fixed random projection of 16px thumbnails; text by hash."""

    image_size = 16

    def __init__(self) -> None:
        self.w = np.random.default_rng(0).normal(size=(16 * 16 * 3, 8))
        self.calls: list[tuple] = []

    def embed_image(self, images) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images)).float()
        x = x / 255 if x.max() > 1.5 else x
        self.calls.append(tuple(x.shape))
        x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear")
        f = x.permute(0, 2, 3, 1).reshape(len(x), -1).numpy() @ self.w
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    def embed_text(self, texts) -> np.ndarray:
        f = np.stack([np.random.default_rng(sum(map(ord, t))).normal(size=8) for t in texts])
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def test_cli_fid_clip_and_clip_score(folders, tmp_path, monkeypatch, capsys):
    a, b = folders
    enc = FakeClip()
    monkeypatch.setattr(fidlib, "load_clip_encoder", lambda path: enc)
    prompts = {f"{i:03d}.png": f"prompt {i % 3}" for i in range(20)}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "metrics.json"
    rc = coco_fid.main(["--samples", str(a), "--reference", str(b), "--features", "clip", "--clip", str(tmp_path),
                        "--prompts", str(tmp_path / "prompts.json"), "--bootstrap", "10", "--retrieve-k", "2",
                        "--protocol", "shapes-v1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    m = json.loads(out.read_text())
    for k in (
        "protocol",
        "seed",
        "ckpt",
        "strategy",
        "cfg_scale",
        "num_samples",
        "retrieve_k",
        "n",
    ):
        assert k in m
    assert (
        m["features"] == "clip"
        and m["metric"] == "FID-CLIP"
        and m["n"] == 20
        and m["retrieve_k"] == 2
    )
    extract, resize = fidlib.clip_extractor(enc)
    direct = fidlib.fid_from_features(
        fidlib.folder_features(a, extract, resize), fidlib.folder_features(b, extract, resize)
    )
    assert m["fid"] == pytest.approx(direct, rel=1e-9)
    from cleanfid import fid as cleanfid

    theirs = cleanfid.compute_fid(str(a), str(b), mode="clean", num_workers=0, device=torch.device("cpu"),
                                  custom_feat_extractor=fidlib._TensorOut(extract), custom_fn_resize=resize,
                                  verbose=False)  # fmt: skip
    assert m["fid"] == pytest.approx(theirs, rel=1e-9)
    files = sorted(a.glob("*.png"))
    img = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    txt = [prompts[f.name] for f in files]
    ii, tt = enc.embed_image(img), enc.embed_text(txt)
    expected = np.mean(100 * np.maximum((ii * tt).sum(1), 0))
    assert m["clip_score"] == pytest.approx(expected, rel=1e-5)
    assert set(m["ci95"]) == {"fid", "clip_score"}
    printed = capsys.readouterr().out
    assert "paper" in printed and "4.88" in printed and "FID-CLIP" in printed
    # a finished run is not overwritten
    assert coco_fid.main(["--samples", str(a), "--reference", str(b), "--out", str(out)]) == 2


def test_prompts_must_cover_samples(folders, tmp_path):
    a, _ = folders
    (tmp_path / "p.jsonl").write_text('{"file": "000.png", "prompt": "x"}\n')
    with pytest.raises(InputError, match="no prompt for image 001.png"):
        fidlib.load_prompts(tmp_path / "p.jsonl", a)
    (tmp_path / "q.jsonl").write_text('{"file": "000.png", "prompt": "x"}\n{oops\n')
    with pytest.raises(InputError, match="line 2"):
        fidlib.load_prompts(tmp_path / "q.jsonl", a)
