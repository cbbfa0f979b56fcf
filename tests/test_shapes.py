"""Shapes world: determinism, exactness of every label, split disjointness, parser accuracy."""

import re

import numpy as np
import pytest
import torch

from lit_cm3leon.data.shapes import (
    BACKGROUND_PALETTE,
    COLORS,
    KINDS,
    PALETTE,
    POSITION_NAMES,
    QTYPES,
    SIZES,
    Scene,
    Shape,
    ShapesImageDataset,
    ShapesWorld,
    answer_vocabulary,
    claims_from_caption,
    is_heldout,
    parse_scene,
    scene_accuracy,
)
from lit_cm3leon.data.shapes_parse import degrade


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(seed=0)


def samples(world, n=150):
    for split in ("train", "heldout"):
        for i in range(n):
            yield world.sample(split, i)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_sample():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for split in ("train", "heldout"):
        for i in (0, 1, 17, 999):
            sa, sb = a.sample(split, i), b.sample(split, i)
            assert sa.scene == sb.scene
            assert np.array_equal(sa.image, sb.image)
            assert sa.caption_long == sb.caption_long
            assert sa.vqa == sb.vqa
            assert sa.edit.instruction == sb.edit.instruction and sa.edit.after == sb.edit.after


def test_different_seeds_and_indices_differ():
    a, b = ShapesWorld(seed=0), ShapesWorld(seed=1)
    keys_a = [a.scene("train", i).key() for i in range(50)]
    keys_b = [b.scene("train", i).key() for i in range(50)]
    assert sum(x != y for x, y in zip(keys_a, keys_b, strict=True)) >= 45
    assert len(set(keys_a)) >= 45


# ---------------------------------------------------------------------------------------------
# Rendering, boxes, segmentation, edges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size,grid", [(32, 3), (16, 2), (21, 3), (48, 4), (64, 3)])
def test_stencils_are_distinct_and_sizes_ordered(image_size, grid):
    world = ShapesWorld(image_size=image_size, grid=grid)
    for size in SIZES:
        masks = [world.stencils[(k, size)] for k in KINDS]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not np.array_equal(masks[i], masks[j])
    for k in KINDS:
        assert world.stencils[(k, "small")].sum() < world.stencils[(k, "large")].sum()
    for i in range(20):
        s = world.sample("heldout", i)
        assert parse_scene(s.image, world).attributes() == s.scene.attributes()


def test_image_segmentation_boxes_edges_agree(world):
    for s in samples(world):
        img, seg, scene = s.image, s.segmentation, s.scene
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert seg.shape == (32, 32) and seg.dtype == np.uint8
        assert set(np.unique(seg)) == set(range(len(scene.shapes) + 1))
        assert (img[seg == 0] == BACKGROUND_PALETTE[scene.background]).all()
        assert len(s.boxes) == len(scene.shapes)
        for i, (shape, (x0, y0, x1, y1)) in enumerate(zip(scene.shapes, s.boxes, strict=True)):
            mask = seg == i + 1
            assert (img[mask] == PALETTE[shape.color]).all()
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight
            assert mask[y0:y1, x0:x1].sum() == mask.sum()  # contains every pixel
            # inside its grid cell
            cx0, cy0, cx1, cy1 = world.cell_box(shape.row, shape.col)
            assert cx0 <= x0 and cy0 <= y0 and x1 <= cx1 and y1 <= cy1
            # edges: a non-empty outline, inside the shape, strictly smaller for large shapes
            e = s.edges.astype(bool) & mask
            assert e.any()
            if shape.size == "large":
                assert e.sum() < mask.sum()
        assert set(np.unique(s.edges)) <= {0, 1}
        assert not (s.edges.astype(bool) & (seg == 0)).any()


def test_edges_are_the_outline():
    w = ShapesWorld()
    scene = Scene("black", (Shape("square", "red", "large", 1, 1),))
    seg = w.segmentation(scene)
    from lit_cm3leon.data.shapes import edges_from_segmentation

    e = edges_from_segmentation(seg)
    side = w.side["large"]
    assert e.sum() == 4 * side - 4  # the square's perimeter ring


def test_other_geometry_renders_and_parses():
    w = ShapesWorld(image_size=48, grid=4, max_shapes=5, seed=2)
    for i in range(30):
        s = w.sample("heldout", i)
        assert s.image.shape == (48, 48, 3)
        assert parse_scene(s.image, w).attributes() == s.scene.attributes()
        assert claims_from_caption(s.caption_long) == s.scene.claims(grid=4, positions=True)


def test_full_grid_world_still_makes_every_label():
    w = ShapesWorld(image_size=16, grid=2, max_shapes=4, seed=1)
    full = 0
    for i in range(60):
        s = w.sample("train", i)
        full += len(s.scene.shapes) == 4
        assert len(s.vqa) >= 5 and s.edit.after != s.edit.before
        assert parse_scene(s.image, w).attributes() == s.scene.attributes()
        assert claims_from_caption(s.caption_long) == s.scene.claims(grid=2, positions=True)
    assert full > 0


def test_cells_aligned_to_the_tokenizer_patch_draw_a_shape_the_same_way_in_every_cell():
    """cell_align=4: 8 px cells on a 4 px margin, so a shape's pixels sit the same way on the
    4 px patches in every cell; the parser reads this world and the default one side by side."""
    aligned, default = ShapesWorld(cell_align=4), ShapesWorld()
    assert (aligned.cell_size, aligned.margin) == (8, 4) and (
        default.cell_size,
        default.margin,
    ) == (10, 1)
    for size in SIZES:
        crops = set()
        for r in range(3):
            for c in range(3):
                scene = Scene("black", (Shape("diamond", "red", size, r, c),))
                x0, y0, x1, y1 = aligned.cell_box(r, c)
                assert x0 % 4 == 0 and y0 % 4 == 0
                crops.add(aligned.render(scene)[y0 - 4 : y1 + 4, x0 - 4 : x1 + 4].tobytes())
        assert len(crops) == 1  # one drawing (with its 4 px surround) for all nine cells
    for i in range(40):  # the parser's templates are kept per geometry
        for w in (aligned, default):
            s = w.sample("heldout", i)
            assert parse_scene(s.image, w).attributes() == s.scene.attributes()
    assert ShapesWorld(image_size=22).cell_size == 7
    with pytest.raises(ValueError, match="cells aligned to 4 px"):
        ShapesWorld(image_size=22, cell_align=4)  # 7 px cells would shrink to 4 px


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ShapesWorld(image_size=8, grid=3)
    with pytest.raises(ValueError):
        ShapesWorld(max_shapes=10)
    for grid in (0, -1):
        with pytest.raises(ValueError, match="grid must be >= 1"):
            ShapesWorld(grid=grid)
    with pytest.raises(ValueError):
        ShapesWorld().sample("val", 0)


# ---------------------------------------------------------------------------------------------
# Language: captions, VQA, edits
# ---------------------------------------------------------------------------------------------

_POS = "|".join(sorted(POSITION_NAMES, key=len, reverse=True))
_REF = re.compile(
    rf"^the (?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLORS)}) )?({'|'.join(KINDS)}|shape)"
    rf"(?: (?:at|on|in) the ({_POS}))?$"
)


def resolve(scene, phrase):
    """All shapes of the scene that a referring expression fits (independent re-implementation)."""
    m = _REF.match(phrase)
    assert m, phrase
    size, color, kind, pos = m.groups()
    return [
        i
        for i, s in enumerate(scene.shapes)
        if (size is None or s.size == size)
        and (color is None or s.color == color)
        and (kind == "shape" or s.kind == kind)
        and (pos is None or POSITION_NAMES[s.row * 3 + s.col] == pos)
    ]


def at(scene, pos):
    return [s for s in scene.shapes if POSITION_NAMES[s.row * 3 + s.col] == pos]


def answer(scene, q):
    """Recompute a VQA answer from the scene alone."""
    if m := re.fullmatch(r"what color is (.+)\?", q):
        (i,) = resolve(scene, m[1])
        return scene.shapes[i].color
    if m := re.fullmatch(rf"what shape is (?:at|on|in) the ({_POS})\?", q):
        (s,) = at(scene, m[1])
        return s.kind
    if q == "how many shapes are there?":
        return str(len(scene.shapes))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
        return str(sum(s.color == m[1] for s in scene.shapes))
    if m := re.fullmatch(r"how many (\w+)s are there\?", q):
        return str(sum(s.kind == m[1] for s in scene.shapes))
    if m := re.fullmatch(r"where is (.+)\?", q):
        (i,) = resolve(scene, m[1])
        s = scene.shapes[i]
        return POSITION_NAMES[s.row * 3 + s.col]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
        return "yes" if any((s.color, s.kind) == (m[1], m[2]) for s in scene.shapes) else "no"
    if m := re.fullmatch(rf"is there a shape (?:at|on|in) the ({_POS})\?", q):
        return "yes" if at(scene, m[1]) else "no"
    if m := re.fullmatch(r"is (the .+) (\w+)\?", q):
        (i,) = resolve(scene, m[1])
        return "yes" if scene.shapes[i].color == m[2] else "no"
    raise AssertionError(f"unknown question form: {q}")


def test_vqa_answers_agree_with_scene(world):
    vocab = set(answer_vocabulary())
    seen_types, yes_no = set(), []
    for s in samples(world):
        types = [qa.qtype for qa in s.vqa]
        if "position" in types:
            assert types == ["color", "shape", "count", "position", "yesno", "yesno"]
        else:  # only when no shape can be named without its position
            assert types == ["color", "shape", "count", "yesno", "yesno"]
            assert len({(x.kind, x.color, x.size) for x in s.scene.shapes}) == 1
        for qa in s.vqa:
            assert qa.qtype in QTYPES and qa.answer in vocab
            assert answer(s.scene, qa.question) == qa.answer, qa
            seen_types.add(qa.qtype)
            if qa.qtype == "yesno":
                yes_no.append(qa.answer)
    assert seen_types == set(QTYPES)
    assert yes_no.count("yes") == yes_no.count("no")


def test_captions_and_claims_round_trip(world):
    for s in samples(world, 100):
        assert claims_from_caption(s.caption_short) == s.scene.claims()
        assert claims_from_caption(s.caption_long) == s.scene.claims(positions=True)
        assert s.caption_long.endswith(f"on a {s.scene.background} background")
    scene = Scene("white", (Shape("circle", "orange", "small", 0, 0),))
    assert world.caption_short(scene) == "an orange circle"
    assert (
        world.caption_long(scene) == "a small orange circle at the top left, on a white background"
    )


def test_claims_from_free_text():
    assert claims_from_caption("Two RED circles, and a blue square on the left.") == {
        ("red", "circle"),
        ("blue", "square", "left"),
    }
    assert claims_from_caption("a large green diamond in the center") == {
        ("green", "diamond", "center")
    }
    assert claims_from_caption("a purple thing near a cat") == set()


def test_edit_changes_exactly_one_attribute(world):
    attrs = set()
    for s in samples(world, 100):
        e = s.edit
        assert e.before == s.scene and e.before.background == e.after.background
        assert np.array_equal(e.before_image, s.image)
        assert np.array_equal(e.after_image, world.render(e.after))
        assert not np.array_equal(e.before_image, e.after_image)
        assert len(e.before.shapes) == len(e.after.shapes)
        for j, (b, a) in enumerate(zip(e.before.shapes, e.after.shapes, strict=True)):
            if j != e.shape_index:
                assert a == b
        b, a = e.before.shapes[e.shape_index], e.after.shapes[e.shape_index]
        changed = [f for f in ("kind", "color", "size") if getattr(a, f) != getattr(b, f)]
        if a.cell != b.cell:
            changed.append("position")
        assert changed == [e.attribute]
        assert len({x.cell for x in e.after.shapes}) == len(e.after.shapes)  # one shape per cell
        # the instruction names the edited shape unambiguously and the new value
        m = (
            re.fullmatch(r"make (the .+) (\w+)", e.instruction)
            or re.fullmatch(r"turn (the .+) into an? (\w+)", e.instruction)
            or re.fullmatch(r"move (the .+) to the (.+)", e.instruction)
        )
        assert m, e.instruction
        assert resolve(e.before, m[1]) == [e.shape_index], e.instruction
        new = {
            "kind": a.kind,
            "color": a.color,
            "size": a.size,
            "position": POSITION_NAMES[a.row * 3 + a.col],
        }
        assert m[2] == new[e.attribute], e.instruction
        if s.split == "train":
            assert not is_heldout(e.after, world.heldout_fraction)
        attrs.add(e.attribute)
    assert attrs == {"kind", "color", "size", "position"}


# ---------------------------------------------------------------------------------------------
# Held-out split
# ---------------------------------------------------------------------------------------------


def test_train_and_heldout_are_disjoint(world):
    train = [world.scene("train", i) for i in range(3000)]
    held = [world.scene("heldout", i) for i in range(3000)]
    assert not any(is_heldout(s, world.heldout_fraction) for s in train)
    assert all(is_heldout(s, world.heldout_fraction) for s in held)
    held_keys = {s.key() for s in held}
    assert not held_keys & {s.key() for s in train}
    assert len(held_keys) >= 1000
    # the split depends on the scene, not on the seed
    other = ShapesWorld(seed=7)
    assert all(is_heldout(other.scene("heldout", i), 0.1) for i in range(200))


def test_key_is_canonical():
    a = Shape("circle", "red", "small", 0, 0)
    b = Shape("square", "blue", "large", 2, 2)
    assert Scene("gray", (a, b)).key() == Scene("gray", (b, a)).key()
    assert Scene("gray", (a, b)).attributes() == Scene("gray", (b, a)).attributes()
    assert Scene("gray", (a, b)).key() != Scene("white", (a, b)).key()
    assert Scene.from_key(Scene("gray", (b, a)).key()) == Scene("gray", (a, b))
    assert Scene.from_key("black|") == Scene("black", ())
    with pytest.raises(ValueError, match="not a scene key"):
        Scene.from_key("black|0,0,red")


# ---------------------------------------------------------------------------------------------
# Parser and accuracy
# ---------------------------------------------------------------------------------------------


def test_parser_recovers_heldout_scenes(world):
    rng = np.random.default_rng(0)
    clean = noisy = 0
    for i in range(300):
        scene = world.scene("heldout", i)
        img = world.render(scene)
        clean += parse_scene(img, world).attributes() == scene.attributes()
        deg = degrade(img, rng, noise_std=10.0, blur="binomial")
        noisy += parse_scene(deg, world).attributes() == scene.attributes()
    assert clean >= 297
    assert noisy >= 291


def test_parser_is_robust_but_not_credulous(world):
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(100):  # a heavier blur (sigma 1.4), or a mild one with a colour cast
        scene = world.scene("heldout", i)
        img = world.render(scene)
        hits += parse_scene(degrade(img, rng, blur="gauss1.4"), world) == scene
        cast = degrade(img, rng, blur="binomial", color_shift=25.0, noise_std=10.0)
        hits += parse_scene(cast, world) == scene
    assert hits >= 194
    for bg in ("black", "white", "gray"):  # noise alone is no shape
        for _ in range(10):
            img = degrade(world.render(Scene(bg, ())), rng, noise_std=25.0)
            assert parse_scene(img, world) == Scene(bg, ())


def test_parser_accepts_chw_float():
    w = ShapesWorld()
    s = w.sample("train", 5)
    chw = s.image.transpose(2, 0, 1).astype(np.float32)
    assert parse_scene(chw, w) == parse_scene(s.image, w)
    signed = torch.from_numpy(chw) / 127.5 - 1.0
    assert parse_scene(signed, w, value_range=(-1.0, 1.0)) == s.scene
    with pytest.raises(ValueError, match="expected an image"):
        parse_scene(np.zeros((16, 16, 3)), w)


def test_scene_accuracy():
    a = Shape("circle", "red", "small", 0, 0)
    b = Shape("square", "blue", "large", 1, 1)
    target = Scene("gray", (a, b))
    perfect = scene_accuracy(Scene("gray", (b, a)), target)
    assert all(v == 1.0 for v in perfect.values())
    recolored = scene_accuracy(Scene("gray", (Shape("circle", "green", "small", 0, 0), b)), target)
    assert recolored["exact"] == 0.0 and recolored["color"] == 0.5 and recolored["kind"] == 1.0
    assert recolored["precision"] == 0.5
    missing = scene_accuracy(Scene("white", (b,)), target)
    assert missing["count"] == 0.0 and missing["background"] == 0.0 and missing["position"] == 0.5
    empty = scene_accuracy(Scene("gray", ()), target)
    assert empty["attributes"] == 0.0 and empty["precision"] == 0.0
    assert missing["attributes_strict"] == missing["attributes"] == 0.5  # no extra shapes
    # Extra shapes do not lower `attributes` (the prompt's shapes still match) but do lower the
    # strict score: 2 matched of 4 parsed shapes.
    extras = (Shape("triangle", "green", "small", 2, 2), Shape("diamond", "red", "large", 0, 2))
    crowded = scene_accuracy(Scene("gray", (a, b, *extras)), target)
    assert crowded["attributes"] == 1.0 and crowded["attributes_strict"] == 0.5


def test_image_dataset(world):
    ds = ShapesImageDataset(world, "train", size=8)
    assert len(ds) == 8
    x = ds[3]
    assert tuple(x.shape) == (3, 32, 32) and x.dtype.is_floating_point
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    ref = world.render(world.scene("train", 3))
    assert np.allclose((x.permute(1, 2, 0).numpy() + 1) * 127.5, ref, atol=1e-3)
    with pytest.raises(IndexError):
        ds[8]


def test_landmarks_are_named_fixed_scenes_seen_in_views():
    """A landmark is a fixed named scene; a view adds one shape in a free cell and is named, not
    described; held-out views are of the same landmarks but never a training scene."""
    from lit_cm3leon.data.shapes import ShapesWorld

    w = ShapesWorld()
    names = [w.landmark(k)[0] for k in range(4096)]
    assert len(set(names)) == 4096 and names[:3] == [ShapesWorld().landmark(k)[0] for k in range(3)]
    assert w.landmark(7) != ShapesWorld(seed=1).landmark(7)
    train = [w.landmark_sample("train", i, 20) for i in range(300)]
    held = [w.landmark_sample("heldout", i, 20) for i in range(60)]
    for s in train + held:
        name = s.caption_short.removeprefix("the ")
        k = names.index(name)
        assert k < 20
        base = w.landmark(k)[1]
        assert s.scene.background == base.background
        assert set(base.shapes) < set(s.scene.shapes) and len(s.scene.shapes) == 3
        assert s.caption_long.startswith(f"the {name} with a ")
        np.testing.assert_array_equal(s.image, w.render(s.scene))
    assert not {s.scene for s in train} & {s.scene for s in held}
    assert {s.caption_short for s in held} <= {s.caption_short for s in train}
    again = w.landmark_sample("train", 5, 20)
    assert again.scene == train[5].scene and again.caption_long == train[5].caption_long
