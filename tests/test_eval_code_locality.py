import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "eval_code_locality", Path(__file__).resolve().parents[1] / "eval" / "code_locality.py"
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
same_code_by_distance = _mod.same_code_by_distance


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
