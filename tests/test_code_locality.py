import numpy as np

from lit_cm3leon.evaluation.code_locality import edit_code_locality, same_code_by_distance


def test_same_code_by_distance_bins_cells_by_their_distance_to_the_change():
    before = np.zeros((1, 16, 16, 3), np.uint8)
    after = before.copy()
    after[0, 1, 1] = 255  # one changed pixel; cells are 8 px, their centres at 4 and 12
    codes_before = np.array([[[1, 2], [3, 4]]])
    codes_after = np.array([[[9, 2], [3, 5]]])  # top-left (near) and bottom-right (far) change
    same, count = same_code_by_distance(before, after, codes_before, codes_after, n_bins=5)
    # distances from the cell centres to pixel centre (1.5, 1.5): 3.5, 10.6, 10.6, 14.8 px
    assert count.tolist() == [1, 0, 2, 1, 0]
    assert same.tolist() == [0, 0, 2, 0, 0]


class _PatchMeanTokenizer:
    """A perfectly local tokenizer: each 4 x 4 patch's code is a hash of its own pixels."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        n, s = images.shape[:2]
        p = images.reshape(n, s // 4, 4, s // 4, 4, 3).astype(np.int64)
        return (p * np.arange(1, 49).reshape(1, 1, 4, 1, 4, 3)).sum((2, 4, 5))


def test_a_local_tokenizer_keeps_every_code_away_from_the_edit():
    from lit_cm3leon.data.shapes import ShapesWorld

    out = edit_code_locality(_PatchMeanTokenizer(), ShapesWorld(), n=20)
    by = out["edit_codes_kept_by_distance_px"]
    assert by["8-12"] == 1.0 and by[">=16"] == 1.0  # a 4 px patch never sees pixels 6+ px away
    assert by["0-4"] < 1.0 and 0 < out["edit_codes_kept"] < 1


class _NoisyTokenizer(_PatchMeanTokenizer):
    """Local codes, each doubled by a coin that distant content decides: one bit more per code."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        codes = super().encode(images)
        coin = np.random.default_rng(0).integers(0, 2, codes.shape)
        return codes * 2 + coin


def test_code_entropy_given_the_patch_is_zero_for_local_codes_and_counts_the_rest():
    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.evaluation.code_locality import scene_code_entropy

    world = ShapesWorld()
    local = scene_code_entropy(_PatchMeanTokenizer(), world, n=200)["code_entropy_given_patch_nats"]
    assert local == {"shape": 0.0, "background": 0.0}
    noisy = scene_code_entropy(_NoisyTokenizer(), world, n=200)["code_entropy_given_patch_nats"]
    # a fair coin is log 2 nats; with ~200 draws per background patch and cell the estimate is near it
    assert 0.6 < noisy["background"] <= np.log(2) + 1e-9
    assert 0 < noisy["shape"] <= np.log(2) + 1e-9
