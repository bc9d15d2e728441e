"""ConceptWorld generation, the ConceptSeg layout round trip, malformed meta, and the data CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge.cli import main
from conceptseg_edge.data.meta import (
    META_FILE,
    ConceptSegDataset,
    MetaItem,
    box_from_fractions,
    box_to_fractions,
    task_info,
)
from conceptseg_edge.data.world import CI_CLASSES, PALETTE, TASKS, ConceptWorld, make_world
from conceptseg_edge.episodes import box_from_mask
from conceptseg_edge.errors import InputError

SIZE = 64


@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"), 30, seed=5, test_fraction=0.3, image_size=SIZE, progress=False)


def test_same_seed_same_arrays_other_seed_other_arrays() -> None:
    a, b, c = ConceptWorld(7, SIZE), ConceptWorld(7, SIZE), ConceptWorld(8, SIZE)
    for index in range(10):
        assert a.episode(index) == b.episode(index)
        assert not np.array_equal(a.episode(index).image, c.episode(index).image)
    assert not np.array_equal(a.episode(0).image, a.episode(10).image)


def test_episode_does_not_depend_on_call_order_or_supports() -> None:
    first = ConceptWorld(2, SIZE).episode(13)
    world = ConceptWorld(2, SIZE)
    for index in range(5):
        world.episode(index)
    assert world.episode(13) == first
    bare = world.episode(13, with_supports=False)
    assert np.array_equal(bare.image, first.image) and bare.supports == ()


def test_every_level_and_task_appears_with_sane_masks_and_supports() -> None:
    world = ConceptWorld(0, SIZE)
    episodes = [world.episode(i) for i in range(len(TASKS))]
    assert {e.level for e in episodes} == {"CI", "CD", "CR"}
    families = {e.task_name if e.task_name != "rare" else TASKS[i] for i, e in enumerate(episodes)}
    assert families == set(TASKS)
    for e in episodes:
        assert e.image.shape == (SIZE, SIZE, 3) and e.image.dtype == np.uint8
        assert e.mask.any() and not e.mask.all(), e.task_name
        assert e.level == task_info(e.task_name, len(e.supports) + 1)[0]
        expected = {"difference": 1, "consistency": 2}.get(e.task_name, 4)
        assert len(e.supports) == expected
        for s in e.supports:
            assert s.mask is not None and s.mask.any() and s.box == box_from_mask(s.mask)
    queries = {e.task_name: e.query for e in episodes}
    assert queries["camouflage"] == "camouflaged object segmentation"
    assert queries["saliency"] == "salient object segmentation"
    assert queries["anomaly"] == "industrial defect segmentation"
    assert queries["polyp"] == "polyp colon segmentation"
    assert queries["skin lesion"] == "skin melanocytic tumor segmentation"
    assert queries["difference"] == "segment the object that differs between the two images"


def test_ci_supports_share_the_class() -> None:
    world = ConceptWorld(4, SIZE)
    episode = world.episode(1)
    assert episode.level == "CI" and episode.query == episode.cls_name
    # Supports come from the same class generator: same query, every one has an instance.
    assert all(s.mask is not None and s.mask.any() for s in episode.supports)


def test_colour_classes_are_that_colour() -> None:
    world = ConceptWorld(11, 96)
    checked = 0
    for index in range(1, 200, 10):  # the colour-class slots
        episode = world.episode(index, with_supports=False)
        cls = next(c for c in CI_CLASSES if c.name == episode.cls_name)
        if cls.colour in ("red", "green", "blue"):
            mean = episode.image[episode.mask].astype(float).mean(axis=0)
            assert int(np.argmax(mean)) == int(np.argmax(PALETTE[cls.colour])), episode.cls_name
            checked += 1
    assert checked >= 5


def test_camouflage_matches_its_surroundings_saliency_does_not() -> None:
    world = ConceptWorld(1, 128)

    def contrast(index: int) -> float:
        e = world.episode(index, with_supports=False)
        inside = e.image[e.mask].astype(float).mean(axis=0)
        outside = e.image[~e.mask].astype(float).mean(axis=0)
        return float(np.abs(inside - outside).max())

    camouflage = [contrast(i) for i in range(4, 60, 10)]
    saliency = [contrast(i) for i in range(3, 60, 10)]
    assert max(camouflage) < min(saliency)
    assert np.median(camouflage) < 25 and np.median(saliency) > 60


def test_rare_classes_are_rare() -> None:
    world = ConceptWorld(0, SIZE)
    ci = [world.episode(i, with_supports=False) for i in range(200) if i % 10 < 3]
    rare = [e for e in ci if e.task_name == "rare"]
    assert len(rare) < len(ci) // 4
    always = ConceptWorld(0, SIZE, rare_rate=1.0).episode(0)
    assert always.task_name == "rare" and always.cls_name in {c.name for c in CI_CLASSES if c.task == "rare"}


def test_layout_round_trip_gives_equal_episodes(world_root: Path) -> None:
    dataset = ConceptSegDataset.open(world_root)
    world = ConceptWorld(5, SIZE)
    seen = []
    for split, _, _, item in dataset.items():
        index = int(Path(item.img_path[-1]).stem)
        assert world.split_of(index, 0.3) == split
        assert dataset.load(item) == world.episode(index).stored()
        seen.append(index)
    assert sorted(seen) == list(range(30))
    assert set(dataset.splits) == {"train", "test"} and all(dataset.splits.values())
    assert not list(world_root.rglob("*.tmp"))


def test_stored_keeps_cr_support_boxes_but_not_masks() -> None:
    episode = ConceptWorld(0, SIZE).episode(9)
    stored = episode.stored()
    assert [s.box for s in stored.supports] == [s.box for s in episode.supports]
    assert all(s.mask is None for s in stored.supports)
    assert ConceptWorld(0, SIZE).episode(0).stored().supports == ()
    assert stored != episode  # the masks differ


def test_cr_items_carry_supports_and_problem(world_root: Path) -> None:
    meta = json.loads((world_root / META_FILE).read_text())
    items = [item for classes in meta.values() for items in classes.values() for item in items]
    cr = [i for i in items if i["task_name"] in ("difference", "consistency")]
    assert cr and all(len(i["img_path"]) == len(i["ref_box"]) + 1 and i["problem"] for i in cr)
    single = [i for i in items if len(i["img_path"]) == 1]
    assert single and not any("ref_box" in i or "problem" in i for i in single)


def test_meta_episode_from_the_dataset(world_root: Path) -> None:
    dataset = ConceptSegDataset.open(world_root)
    rng = np.random.default_rng(0)
    for split, cls_name, index, item in dataset.items():
        ep = dataset.meta_episode(split, cls_name, index, rng)
        assert ep.target.shape == (600, 600, 3) and ep.gt_box is not None
        if item.level == "CR":
            assert ep.mosaic is not None
            assert ep.has_hidden_box == (len(item.img_path) > 2)
        else:
            pool = dataset.splits["train"].get(cls_name, ())
            candidates = len(pool) - (split == "train")
            assert (ep.mosaic is None) == (candidates == 0)
    with pytest.raises(InputError, match="no such item"):
        dataset.meta_episode("train", "no such class", 0, rng)


def test_box_fractions_round_trip() -> None:
    for w, h in ((64, 64), (640, 480), (97, 13)):
        for box in ((0, 0, w - 1, h - 1), (3, 2, 5, 7), (w // 2, h // 3, w - 2, h - 1)):
            assert box_from_fractions(box_to_fractions(box, w, h), w, h) == box
    assert box_to_fractions((0, 0, 63, 63), 64, 64) == (0.0, 0.0, 1.0, 1.0)
    assert box_from_fractions((-0.1, 0.5, 1.3, 0.5), 10, 10) == (0, 5, 9, 5)


def test_task_info_and_query_fallbacks() -> None:
    assert task_info("COD10K camouflage") == ("CD", "camouflaged object segmentation")
    assert task_info("shadow detection") == ("CD", "shadow")
    assert task_info("something new", 3) == ("CR", None)
    assert task_info("living") == ("CI", None)
    base = {"img_path": ["a.png"], "mask_path": "m.png", "task_name": "living", "cls_name": "dog",
            "dataset_name": "x"}  # fmt: skip
    assert MetaItem.from_json(base, "w").query == "dog"
    assert MetaItem.from_json({**base, "task_name": "polyp"}, "w").query == "polyp colon segmentation"
    assert MetaItem.from_json({**base, "problem": "which one?"}, "w").query == "which one?"
    assert MetaItem.from_json({**base, "img_path": "a.png"}, "w").img_path == ("a.png",)


def _write_meta(root: Path, meta: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / META_FILE).write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return root


GOOD = {"img_path": ["images/000000.png"], "mask_path": "masks/000000.png", "task_name": "shape",
        "cls_name": "triangle", "dataset_name": "conceptworld-shape"}  # fmt: skip


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ("{not json", "unreadable JSON"),
        ([1, 2], "expected"),
        ({"train": [GOOD]}, "train"),
        ({"train": {"triangle": GOOD}}, "train/triangle"),
        ({"train": {"triangle": [{k: v for k, v in GOOD.items() if k != "img_path"}]}}, r"\[0\]\.img_path"),
        ({"train": {"triangle": [{**GOOD, "img_path": []}]}}, "img_path"),
        ({"train": {"triangle": [{**GOOD, "mask_path": 3}]}}, "mask_path"),
        ({"train": {"triangle": [{**GOOD, "cls_name": ""}]}}, "cls_name"),
        ({"train": {"triangle": [{**GOOD, "img_path": ["/etc/passwd"]}]}}, r"img_path\[0\]"),
        ({"train": {"triangle": [{**GOOD, "problem": 5}]}}, "problem"),
        ({"train": {"triangle": [{**GOOD, "ref_box": [[0, 0, 1]]}]}}, "ref_box"),
        ({"train": {"triangle": [{**GOOD, "img_path": ["images/000000.png"] * 3, "ref_box": [[0, 0, 1, 1]]}]}},
         "ref_box"),  # fmt: skip
        ({"train": {"triangle": [{**GOOD, "img_path": ["images/missing.png"]}]}}, r"img_path\[0\]: file not found"),
        ({"train": {"triangle": [{**GOOD, "mask_path": "masks/missing.png"}]}}, "mask_path: file not found"),
    ],
)
def test_malformed_meta_raises_input_error_naming_the_field(
    world_root: Path, tmp_path: Path, meta: object, field: str
) -> None:
    root = tmp_path / "bad"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        (root / sub / "000000.png").write_bytes((world_root / sub / "000000.png").read_bytes())
    _write_meta(root, meta)
    with pytest.raises(InputError, match=field):
        ConceptSegDataset.open(root)


def test_missing_meta_and_unreadable_images(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        ConceptSegDataset.open(tmp_path)
    root = _write_meta(tmp_path / "broken", {"train": {"triangle": [GOOD]}})
    for rel in (GOOD["img_path"][0], GOOD["mask_path"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not a png")
    dataset = ConceptSegDataset.open(root)
    with pytest.raises(InputError, match="not a readable image"):
        dataset.load(dataset.item("train", "triangle", 0))


def test_make_world_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="n:"):
        make_world(tmp_path, 0, progress=False)
    with pytest.raises(InputError, match="test_fraction"):
        make_world(tmp_path, 3, test_fraction=1.0, progress=False)
    with pytest.raises(InputError, match="image_size"):
        make_world(tmp_path, 3, image_size=16, progress=False)
    assert not (tmp_path / META_FILE).exists()


def test_cli_make_world_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cw"
    assert main(["data", "make-world", "--out", str(out), "--n", "12", "--seed", "3", "--image-size", "64"]) == 0
    dataset = ConceptSegDataset.open(out)
    assert sum(1 for _ in dataset.items()) == 12
    assert main(["data", "check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "test:" in printed and "CR difference" in printed
    assert main(["data", "make-world", "--out", str(tmp_path / "x"), "--n", "0"]) == 2
    assert "error: n:" in capsys.readouterr().err


def test_mask_of_another_size_is_rejected(world_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    root = _write_meta(tmp_path / "sizes", {"train": {"triangle": [GOOD]}})
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / GOOD["img_path"][0]).write_bytes((world_root / "images" / "000000.png").read_bytes())
    Image.new("L", (SIZE // 2, SIZE // 2)).save(root / GOOD["mask_path"])
    dataset = ConceptSegDataset.open(root)
    with pytest.raises(InputError, match="mask is"):
        dataset.load(dataset.item("train", "triangle", 0))
