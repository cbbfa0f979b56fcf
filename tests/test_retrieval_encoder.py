"""ClipEncoder: document vectors, save/load, preprocessing, offline errors."""

import numpy as np
import pytest
import torch

from lit_cm3leon.retrieval.encoder import ClipEncoder, list_archs, load_encoder, mean_of_modalities

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return ClipEncoder.from_arch("shapes-clip")


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_mean_of_modalities_hand_made():
    t = np.array([[1.0, 0, 0], [0, 0, 0], [3.0, 4.0, 0]], np.float32)
    i = np.array([[0, 1.0, 0], [0, 0, 2.0], [0, 0, 0]], np.float32)
    out = mean_of_modalities(t, i)
    np.testing.assert_allclose(out[0], _unit([1, 1, 0]), atol=1e-6)  # both: normalized mean
    np.testing.assert_allclose(out[1], [0, 0, 1], atol=1e-6)  # image alone
    np.testing.assert_allclose(out[2], [0.6, 0.8, 0], atol=1e-6)  # text alone, normalized
    # each modality is normalized before the mean: a longer text vector does not dominate
    out2 = mean_of_modalities(np.array([[10.0, 0]]), np.array([[0, 1.0]]))
    np.testing.assert_allclose(out2[0], _unit([1, 1]), atol=1e-6)


def test_embed_document_is_normalized_mean(enc):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    text = "a red circle at the top left"
    t, i = enc.embed_text([text])[0], enc.embed_image(img[None])[0]
    assert t.shape == (128,) and abs(np.linalg.norm(t) - 1) < 1e-5
    np.testing.assert_allclose(enc.embed_document(text, img), _unit(t + i), atol=1e-5)
    np.testing.assert_allclose(enc.embed_document(text, None), t, atol=1e-6)
    np.testing.assert_allclose(enc.embed_document(None, img), i, atol=1e-6)
    batch = enc.embed_documents([text, None, text], [img, img, None])
    np.testing.assert_allclose(batch, np.stack([_unit(t + i), i, t]), atol=1e-5)
    with pytest.raises(ValueError, match="neither text nor image"):
        enc.embed_documents([None], [None])


def test_uint8_and_float_images_agree_and_resize(enc):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(enc.embed_image(img), enc.embed_image(img / 255.0), atol=1e-5)
    assert enc.pixels(img).shape == (3, 3, 32, 32)
    assert enc.pixels(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
        enc.pixels(np.zeros((2, 3, 32, 32), np.uint8))


def test_save_load_roundtrip(enc, tmp_path, caplog):
    img = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    manifest = enc.save(tmp_path / "enc")
    assert manifest["dim"] == 128 and manifest["name"] == "shapes-clip"
    state = torch.load(tmp_path / "enc" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with caplog.at_level("WARNING"):
        back = load_encoder(str(tmp_path / "enc"))
    # open_clip's "initialized randomly" would be false here: the saved weights are loaded
    assert not [r for r in caplog.records if "weights" in r.getMessage()]
    assert back.hash == enc.hash and back.name == "shapes-clip"
    np.testing.assert_array_equal(back.embed_image(img), enc.embed_image(img))
    np.testing.assert_array_equal(
        back.embed_text(["a blue square"]), enc.embed_text(["a blue square"])
    )


def test_local_pretrained_file_and_offline_tag(enc, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(enc.model.state_dict(), path)
    again = ClipEncoder.from_arch("shapes-clip", pretrained=str(path))
    assert again.hash == enc.hash
    with pytest.raises(RuntimeError, match="local open_clip checkpoint"):
        ClipEncoder.from_arch("shapes-clip", pretrained="openai")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        ClipEncoder.from_arch("no-such-arch")
    with pytest.raises(FileNotFoundError, match="experiment=retriever"):
        load_encoder(str(tmp_path / "missing" / "retriever"))


def test_shipped_archs_forward_32px():
    for arch in list_archs():
        e = ClipEncoder.from_arch(arch)
        out = e.model(e.pixels(np.zeros((2, 32, 32, 3), np.uint8)), e.tokenize(["a", "b"]))
        assert out[0].shape == (2, e.dim) and out[1].shape == (2, e.dim)


def test_encode_text_stops_at_the_last_pooled_token(enc):
    """Features and gradients equal open_clip's full-context encode_text, though the batch runs
    only up to its longest caption (the tower is causal and pools the end-of-text token)."""
    texts = ["a red circle", "a small blue square at the top left and a large green triangle"]
    tok = enc.tokenize(texts)
    assert int(tok.argmax(-1).max()) + 1 < tok.shape[1]  # there is padding to skip
    w = torch.randn(len(texts), enc.dim, generator=torch.Generator().manual_seed(0))
    enc.model.train()
    ours = enc.encode_text(tok)
    (ours * w).sum().backward()
    g_ours = enc.model.token_embedding.weight.grad.clone()
    enc.model.zero_grad()
    theirs = enc.model.encode_text(tok, normalize=True)
    (theirs * w).sum().backward()
    g_theirs = enc.model.token_embedding.weight.grad
    assert g_theirs.abs().sum() > 0  # a loss with a gradient to compare
    enc.model.zero_grad()
    enc.model.eval()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    scale = float(g_theirs.abs().max())  # float rounding differs in the summed positions
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(enc.embed_text(texts), theirs.detach().numpy(), rtol=1e-5, atol=1e-5)
