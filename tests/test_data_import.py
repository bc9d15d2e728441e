"""``data import``: MVTec-AD, image/mask folder and COCO trees written here become ConceptSeg roots with the
right levels, queries, boxes and paths, that the training reader loads; every bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptseg_edge._compat import is_available
from conceptseg_edge.cli import main
from conceptseg_edge.data.importers import (
    COCO_TASK,
    GENERIC_TASKS,
    MVTEC_TASK,
    SplitRule,
    coco_segmentation_mask,
    import_coco,
    import_folder,
    import_mvtec,
    polygon_mask,
)
from conceptseg_edge.data.meta import META_FILE, ConceptSegDataset, box_to_fractions, task_info
from conceptseg_edge.errors import DependencyError, InputError
from conceptseg_edge.train.items import EpisodeData, meta_items

SIZE = 32


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Mask of rows y0..y1-1, columns x0..x1-1."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    Image.fromarray(array).save(path, **kwargs)
    return path


def _meta(root: Path) -> dict:
    return json.loads((root / META_FILE).read_text())


def _all_items(root: Path) -> dict[str, dict]:
    """Every item of all_meta.json by its target path, with its split and class added."""
    return {
        item["img_path"][-1]: {**item, "split": split, "cls": cls}
        for split, classes in _meta(root).items()
        for cls, items in classes.items()
        for item in items
    }


def _no_leftovers(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------- MVTec-AD

# (category, defect, stem) -> mask; "good" images have none.
MVTEC = {
    ("bottle", "broken_large", "000"): _rect(4, 12, 6, 20),
    ("bottle", "broken_large", "001"): _rect(0, 32, 30, 32),
    ("bottle", "contamination", "000"): _rect(10, 11, 10, 11),
    ("bottle", "good", "000"): None,
    ("screw", "scratch_head", "000"): _rect(20, 30, 1, 5),
    ("screw", "good", "000"): None,
}


def _mvtec_tree(root: Path) -> Path:
    for k, ((category, defect, stem), mask) in enumerate(MVTEC.items()):
        _save(root / category / "test" / defect / f"{stem}.png", _image(k))
        if mask is not None:
            _save(root / category / "ground_truth" / defect / f"{stem}_mask.png", mask)
    _save(root / "bottle" / "train" / "good" / "000.png", _image(99))  # defect-free train images: not imported
    return root


def test_mvtec_items_levels_queries_boxes_and_paths(tmp_path):
    src = _mvtec_tree(tmp_path / "mvtec")
    summary = import_mvtec(src, tmp_path / "out", split=SplitRule(test_fraction=0.0))
    assert summary.total == len(MVTEC) and summary.counts == {("train", "CD"): len(MVTEC)}
    items = _all_items(tmp_path / "out")
    assert len(items) == len(MVTEC)
    for k, ((category, defect, stem), mask) in enumerate(MVTEC.items()):
        rel = f"{category}/test/{defect}/{stem}.png"
        item = items[f"images/{rel}"]
        assert item["mask_path"] == f"masks/{rel}"
        assert item["task_name"] == MVTEC_TASK and "problem" not in item
        assert item["cls"] == item["cls_name"] == f"{category} {defect.replace('_', ' ')}"
        assert item["dataset_name"] == "mvtec"
        assert (tmp_path / "out" / item["img_path"][0]).read_bytes() == (src / rel).read_bytes()
        written = np.array(Image.open(tmp_path / "out" / item["mask_path"])) > 127
        assert np.array_equal(written, mask if mask is not None else np.zeros((SIZE, SIZE), bool))
        if mask is None:
            assert "ref_box" not in item
        else:
            rows, cols = np.nonzero(mask)
            box = (cols.min(), rows.min(), cols.max(), rows.max())
            assert item["ref_box"] == [list(box_to_fractions(box, SIZE, SIZE))]
    assert items["images/bottle/test/broken_large/000.png"]["ref_box"] == [[6 / 32, 4 / 32, 20 / 32, 12 / 32]]

    dataset = ConceptSegDataset.open(tmp_path / "out")
    assert {item.level for *_, item in dataset.items()} == {"CD"}
    assert {item.query for *_, item in dataset.items()} == {"industrial defect segmentation"}


def test_mvtec_set_loads_with_the_training_reader(tmp_path):
    import_mvtec(_mvtec_tree(tmp_path / "mvtec"), tmp_path / "out", split=SplitRule(test_fraction=0.0))
    loaded = meta_items(EpisodeData(source="meta", root=str(tmp_path / "out"), support_prob=1.0), "train")
    defects = [mask for mask in MVTEC.values() if mask is not None]
    assert len(loaded) == len(defects)  # good images (empty masks) are not training targets
    assert {item.level for item in loaded} == {"CD"} and {item.task for item in loaded} == {MVTEC_TASK}
    assert sorted(int(item.mask.sum()) for item in loaded) == sorted(int(m.sum()) for m in defects)
    assert all(item.meta.gt_box is not None for item in loaded)


def test_mvtec_single_category_folder(tmp_path):
    src = _mvtec_tree(tmp_path / "mvtec")
    import_mvtec(src / "screw", tmp_path / "out", name="screws", split=SplitRule(test_fraction=0.0))
    items = _all_items(tmp_path / "out")
    assert set(items) == {"images/test/scratch_head/000.png", "images/test/good/000.png"}
    assert {item["dataset_name"] for item in items.values()} == {"screws"}
    assert {item["cls_name"] for item in items.values()} == {"screw scratch head", "screw good"}


def test_split_is_stable_and_follows_the_fraction(tmp_path):
    src = tmp_path / "mvtec"
    for i in range(40):
        _save(src / "tile" / "test" / "good" / f"{i:03d}.png", _image(i))
    import_mvtec(src, tmp_path / "a", split=SplitRule(test_fraction=0.5, seed=1))
    first = {path: item["split"] for path, item in _all_items(tmp_path / "a").items()}
    assert 8 <= sum(s == "test" for s in first.values()) <= 32
    _save(src / "tile" / "test" / "good" / "new.png", _image(77))  # an added file moves no other image
    import_mvtec(src, tmp_path / "a", split=SplitRule(test_fraction=0.5, seed=1))  # over the old root
    again = {path: item["split"] for path, item in _all_items(tmp_path / "a").items()}
    assert {p: s for p, s in again.items() if p in first} == first and len(again) == 41
    import_mvtec(src, tmp_path / "b", split=SplitRule(test_fraction=1.0))
    assert {item["split"] for item in _all_items(tmp_path / "b").values()} == {"test"}
    with pytest.raises(InputError, match="--test-fraction"):
        SplitRule(test_fraction=1.5)


def test_mvtec_missing_mask_is_named(tmp_path):
    src = _mvtec_tree(tmp_path / "mvtec")
    missing = src / "bottle" / "ground_truth" / "contamination" / "000_mask.png"
    missing.unlink()
    with pytest.raises(InputError, match=f"{missing}.* is missing"):
        import_mvtec(src, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_mvtec_unreadable_image_and_wrong_mask_size_are_named(tmp_path):
    src = _mvtec_tree(tmp_path / "mvtec")
    bad = src / "screw" / "test" / "scratch_head" / "000.png"  # the last item: everything before it was written
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match=f"{bad}: not a readable image"):
        import_mvtec(src, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")
    _save(bad, _image(5))
    mask = src / "bottle" / "ground_truth" / "broken_large" / "001_mask.png"
    _save(mask, np.zeros((16, 32), dtype=bool))
    with pytest.raises(InputError, match=f"{mask}: mask is 32x16 px but .*001.png is 32x32"):
        import_mvtec(src, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_mvtec_empty_root_and_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images in <category>/test/<defect>/"):
        import_mvtec(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(InputError, match="not a directory"):
        import_mvtec(tmp_path / "nowhere", tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_a_symlink_out_of_the_source_is_refused(tmp_path):
    src = _mvtec_tree(tmp_path / "mvtec")
    outside = _save(tmp_path / "secret.png", _image(3))
    (src / "bottle" / "test" / "good" / "link.png").symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        import_mvtec(src, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------- folder pairs

FOLDER = {"cju0": _rect(3, 20, 5, 25), "cju1": _rect(10, 30, 0, 12), "sub/cju2": _rect(0, 8, 0, 8)}


def _folder_tree(root: Path, mask_suffix: str = "") -> Path:
    for k, (stem, mask) in enumerate(FOLDER.items()):
        _save(root / "images" / f"{stem}.jpg", _image(k), quality=95)
        _save(root / "masks" / f"{stem}{mask_suffix}.jpg", mask, quality=95)  # JPEG masks, as Kvasir-SEG ships
    return root


def test_folder_pairs_polyp_is_cd_with_its_canonical_query(tmp_path):
    src = _folder_tree(tmp_path / "kvasir")
    import_folder(src, tmp_path / "out", "polyp", split=SplitRule(test_fraction=0.0))
    items = _all_items(tmp_path / "out")
    assert set(items) == {f"images/{stem}.jpg" for stem in FOLDER}
    for stem, mask in FOLDER.items():
        item = items[f"images/{stem}.jpg"]
        assert item["mask_path"] == f"masks/{stem}.png" and item["task_name"] == "polyp" and "problem" not in item
        assert item["cls_name"] == "polyp" and item["dataset_name"] == "kvasir"
        written = np.array(Image.open(tmp_path / "out" / item["mask_path"]))
        assert set(np.unique(written)) <= {0, 255} and np.array_equal(written > 127, mask)  # JPEG noise thresholded
        rows, cols = np.nonzero(mask)
        assert item["ref_box"] == [list(box_to_fractions((cols.min(), rows.min(), cols.max(), rows.max()), SIZE, SIZE))]
    dataset = ConceptSegDataset.open(tmp_path / "out")
    assert {(i.level, i.query) for *_, i in dataset.items()} == {("CD", "polyp colon segmentation")}
    loaded = meta_items(EpisodeData(source="meta", root=str(tmp_path / "out"), support_prob=1.0), "train")
    assert len(loaded) == len(FOLDER) and all(np.array_equal(i.mask, FOLDER[k]) for i, k in zip(loaded, sorted(FOLDER)))


@pytest.mark.parametrize(
    ("cls_name", "level", "task", "query", "read_level"),
    [
        ("polyp", None, "polyp", "polyp colon segmentation", "CD"),
        ("polyp", "CD", "polyp", "polyp colon segmentation", "CD"),
        ("polyp", "CI", GENERIC_TASKS["CI"], "polyp", "CI"),
        ("tumor", "CD", GENERIC_TASKS["CD"], "tumor", "CD"),
        ("car", None, "car", "car", "CI"),
    ],
)
def test_folder_level_is_what_the_layout_reads_back(tmp_path, cls_name, level, task, query, read_level):
    import_folder(_folder_tree(tmp_path / "src"), tmp_path / "out", cls_name, level=level)
    items = [item for *_, item in ConceptSegDataset.open(tmp_path / "out").items()]
    assert {(i.task_name, i.query, i.level, i.cls_name) for i in items} == {(task, query, read_level, cls_name)}


def test_generic_and_fixed_tasks_read_back_at_their_level():
    assert {level: task_info(task)[0] for level, task in GENERIC_TASKS.items()} == {"CI": "CI", "CD": "CD"}
    assert task_info(MVTEC_TASK) == ("CD", "industrial defect segmentation") and task_info(COCO_TASK)[0] == "CI"


def test_folder_mask_suffix_and_custom_folders(tmp_path):
    src = tmp_path / "isic"
    for k, (stem, mask) in enumerate(FOLDER.items()):
        _save(src / "train_img" / f"{stem}.png", _image(k))
        _save(src / "train_gt" / f"{stem}_segmentation.png", mask)
    import_folder(src, tmp_path / "out", "skin lesion", images="train_img", masks="train_gt",
                  mask_suffix="_segmentation", split=SplitRule(test_fraction=0.0))  # fmt: skip
    items = _all_items(tmp_path / "out")
    assert set(items) == {f"images/{stem}.png" for stem in FOLDER}
    assert {i["mask_path"] for i in items.values()} == {f"masks/{stem}.png" for stem in FOLDER}
    assert {i.query for *_, i in ConceptSegDataset.open(tmp_path / "out").items()} == {"skin melanocytic tumor segmentation"}


def test_folder_pairing_errors_name_the_file(tmp_path):
    src = _folder_tree(tmp_path / "src")
    (src / "masks" / "cju1.jpg").unlink()
    with pytest.raises(InputError, match=f"{src / 'images' / 'cju1.jpg'}: no mask at"):
        import_folder(src, tmp_path / "out", "polyp")
    _save(src / "masks" / "cju1.jpg", FOLDER["cju1"])
    _save(src / "masks" / "cju1.png", FOLDER["cju1"])
    with pytest.raises(InputError, match="cju1.jpg: 2 masks"):
        import_folder(src, tmp_path / "out", "polyp")
    (src / "masks" / "cju1.png").unlink()
    orphan = _save(src / "masks" / "lonely.png", FOLDER["cju1"])
    with pytest.raises(InputError, match=f"{orphan}: a mask without an image"):
        import_folder(src, tmp_path / "out", "polyp")
    orphan.unlink()
    with pytest.raises(InputError, match="--masks .*: not a directory"):
        import_folder(src, tmp_path / "out", "polyp", masks="gt")
    with pytest.raises(InputError, match="--images: '../x'"):
        import_folder(src, tmp_path / "out", "polyp", images="../x")
    with pytest.raises(InputError, match="--class: expected a class name"):
        import_folder(src, tmp_path / "out", "  ")
    with pytest.raises(InputError, match="--level: expected one of"):
        import_folder(src, tmp_path / "out", "polyp", level="CR")
    _save(tmp_path / "elsewhere" / "x.jpg", _image(1))
    (src / "images" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(InputError, match="images/linked.*outside"):  # a folder link out is named, not skipped
        import_folder(src, tmp_path / "out", "polyp")
    _no_leftovers(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------- COCO


def _coco_tree(root: Path) -> Path:
    """Three images: two categories on the first (a polygon pair and an RLE), none on the third."""
    for k, name in enumerate(("a.jpg", "sub/b.png", "c.png")):
        _save(root / "images" / name, _image(k))
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": SIZE, "width": SIZE},
            {"id": 2, "file_name": "sub/b.png", "height": SIZE, "width": SIZE},
            {"id": 3, "file_name": "c.png", "height": SIZE, "width": SIZE},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            # rectangle x 1..5, y 1..4 (edges): pixels columns 1-4, rows 1-3, 12 px
            {"id": 1, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
            # a second dog: a triangle with its right angle at (20, 20)
            {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": [[20, 20, 30, 20, 20, 30]]},
            # uncompressed RLE, column-major: 162 zeros (column 5 up to row 2), 2 ones, 30 zeros, 2 ones, rest
            {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 1,
             "segmentation": {"size": [SIZE, SIZE], "counts": [162, 2, 30, 2, SIZE * SIZE - 196]}},
            {"id": 4, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 32, 0, 32, 32, 0, 32]]},
        ],
    }  # fmt: skip
    path = root / "annotations" / "instances.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_polygon_rasterisation_covers_pixel_centres():
    rect = polygon_mask(np.array([[1, 1], [5, 1], [5, 4], [1, 4]], float), (SIZE, SIZE))
    assert np.array_equal(rect, _rect(1, 4, 1, 5)) and rect.sum() == 12  # its area, no outline pixels added
    tri = polygon_mask(np.array([[20, 20], [30, 20], [20, 30]], float), (SIZE, SIZE))
    # area 50: the 45 centres strictly inside; the 9 on the hypotenuse (x + y = 50) fall out, not in twice
    assert tri.sum() == 45 and tri[20, 20] and tri[20, 28] and tri[28, 20] and not tri[20, 29] and not tri[24, 25]
    clipped = polygon_mask(np.array([[-5, -5], [40, -5], [40, 3], [-5, 3]], float), (SIZE, SIZE))
    assert np.array_equal(clipped, _rect(0, 3, 0, 32))


def test_coco_items_are_ci_per_image_and_category(tmp_path):
    path = _coco_tree(tmp_path / "coco")
    summary = import_coco(path, tmp_path / "out", images=tmp_path / "coco" / "images", split=SplitRule(test_fraction=0.0))
    assert summary.counts == {("train", "CI"): 3}
    meta = _meta(tmp_path / "out")
    assert {cls: [i["img_path"] for i in items] for cls, items in meta["train"].items()} == {
        "dog": [["images/a.jpg"]],
        "car": [["images/a.jpg"], ["images/sub/b.png"]],
    }
    items = {(i["cls_name"], i["img_path"][0]): i for items in meta["train"].values() for i in items}
    dog, car_a, car_b = items[("dog", "images/a.jpg")], items[("car", "images/a.jpg")], items[("car", "images/sub/b.png")]
    assert (dog["mask_path"], car_a["mask_path"], car_b["mask_path"]) == ("masks/a.18.png", "masks/a.3.png", "masks/sub/b.3.png")
    assert all(i["task_name"] == COCO_TASK and i["dataset_name"] == "instances" and "problem" not in i for i in items.values())
    dog_mask = np.array(Image.open(tmp_path / "out" / dog["mask_path"])) > 127
    expected = _rect(1, 4, 1, 5) | polygon_mask(np.array([[20, 20], [30, 20], [20, 30]], float), (SIZE, SIZE))
    assert np.array_equal(dog_mask, expected)
    assert dog["ref_box"] == [[1 / 32, 1 / 32, 29 / 32, 29 / 32]]  # the box of the union of both dogs
    car_mask = np.array(Image.open(tmp_path / "out" / car_a["mask_path"])) > 127
    assert np.array_equal(car_mask, _rect(2, 4, 5, 7)) and car_a["ref_box"] == [[5 / 32, 2 / 32, 7 / 32, 4 / 32]]
    assert car_b["ref_box"] == [[0.0, 0.0, 1.0, 1.0]]
    assert (tmp_path / "out" / "images" / "a.jpg").read_bytes() == (tmp_path / "coco" / "images" / "a.jpg").read_bytes()
    assert not (tmp_path / "out" / "images" / "c.png").exists()  # no annotations: no item, no copy
    dataset = ConceptSegDataset.open(tmp_path / "out")
    assert sorted((i.level, i.query) for *_, i in dataset.items()) == [("CI", "car"), ("CI", "car"), ("CI", "dog")]
    loaded = meta_items(EpisodeData(source="meta", root=str(tmp_path / "out"), support_prob=1.0), "train")
    assert sorted(i.query for i in loaded) == ["car", "car", "dog"] and {i.level for i in loaded} == {"CI"}


def _edit_coco(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


COCO_ERRORS = {
    "file_name_escapes": (lambda d: d["images"][0].update(file_name="../../secret.png"),
                          r"images\[0\].file_name: '../../secret.png' must be a relative path"),
    "image_missing": (lambda d: d["images"][1].update(file_name="sub/gone.png"), r"sub/gone.png: image not found"),
    "size_differs": (lambda d: d["images"][0].update(width=64), r"a.jpg: is 32x32 px but the annotations say 64x32"),
    "unknown_category": (lambda d: d["annotations"][0].update(category_id=7),
                         r"annotations\[0\].category_id: 7 is not in categories"),
    "unknown_image": (lambda d: d["annotations"][3].update(image_id=9), r"annotations\[3\].image_id: 9 is not in images"),
    "odd_polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 1, 5]]),
                    r"annotations\[0\].segmentation\[0\]: expected a polygon"),
    "rle_wrong_sum": (lambda d: d["annotations"][2]["segmentation"].update(counts=[1, 2]),
                      r"annotations\[2\].segmentation.counts: runs sum to 3"),
    "rle_wrong_size": (lambda d: d["annotations"][2]["segmentation"].update(size=[8, 8]),
                       r"annotations\[2\].segmentation.size: \[8, 8\] but the image is \[32, 32\]"),
    "no_segmentation": (lambda d: d["annotations"][1].pop("segmentation"), r"annotations\[1\].segmentation: missing"),
    "bad_category": (lambda d: d["categories"].append({"id": 4}), r"categories\[2\].name: expected a non-empty string"),
    "bool_id": (lambda d: d["images"][0].update(id=True), r"images\[0\].id: expected an integer"),
    "not_a_list": (lambda d: d.update(annotations={}), r"annotations: expected a list"),
    "no_annotations": (lambda d: d.update(annotations=[]), r"no annotations, nothing to import"),
}  # fmt: skip


@pytest.mark.parametrize("case", COCO_ERRORS)
def test_coco_bad_input_is_named(tmp_path, case):
    path = _coco_tree(tmp_path / "coco")
    edit, says = COCO_ERRORS[case]
    _edit_coco(path, edit)
    with pytest.raises(InputError, match=says):
        import_coco(path, tmp_path / "out", images=tmp_path / "coco" / "images")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_coco_unreadable_annotation_file(tmp_path):
    with pytest.raises(InputError, match="annotation file not found"):
        import_coco(tmp_path / "none.json", tmp_path / "out")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="bad.json: unreadable JSON"):
        import_coco(tmp_path / "bad.json", tmp_path / "out")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(InputError, match="expected an object with images, annotations and categories"):
        import_coco(tmp_path / "list.json", tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_compressed_rle_needs_pycocotools():
    seg = {"size": [SIZE, SIZE], "counts": "PPY12N0"}
    if is_available("pycocotools"):
        from pycocotools import mask as coco_mask

        expected = _rect(2, 4, 5, 7)
        encoded = coco_mask.encode(np.asfortranarray(expected.astype(np.uint8)))
        decoded = coco_segmentation_mask({"size": [SIZE, SIZE], "counts": encoded["counts"].decode()}, (SIZE, SIZE), "s")
        assert np.array_equal(decoded, expected)
    else:
        with pytest.raises(DependencyError, match="ann.segmentation: compressed RLE needs pycocotools"):
            coco_segmentation_mask(seg, (SIZE, SIZE), "ann.segmentation")


# --------------------------------------------------------------------------- output and CLI


def test_output_is_checked_first_and_never_clobbered(tmp_path):
    src = _mvtec_tree(tmp_path / "mvtec")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="--out .*file.txt.*exists and is not a directory"):
        import_mvtec(tmp_path / "no-such-source", tmp_path / "file.txt")  # the output error comes first
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a ConceptSeg dataset root; refusing to replace it"):
        import_mvtec(src, other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    import_mvtec(src, tmp_path / "out")
    import_folder(_folder_tree(tmp_path / "kvasir"), tmp_path / "out", "polyp")  # replaces the old root whole
    assert all(p.startswith("images/cju") or p.startswith("images/sub/") for p in _all_items(tmp_path / "out"))
    assert not (tmp_path / "out" / "images" / "bottle").exists()


def test_cli_imports_each_layout(tmp_path, capsys):
    mvtec, kvasir, coco = _mvtec_tree(tmp_path / "mvtec"), _folder_tree(tmp_path / "kvasir"), _coco_tree(tmp_path / "coco")
    assert main(["data", "import", "mvtec", str(mvtec), "--out", str(tmp_path / "m"), "--test-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"imported {len(MVTEC)} items to {tmp_path / 'm'}" in out and "CD anomaly" in out
    assert main(["data", "import", "folder", str(kvasir), "--class", "polyp", "--level", "CD", "--out", str(tmp_path / "k"),
                 "--name", "kvasir-seg"]) == 0  # fmt: skip
    assert "CD polyp" in capsys.readouterr().out
    assert {i.dataset_name for *_, i in ConceptSegDataset.open(tmp_path / "k").items()} == {"kvasir-seg"}
    assert main(["data", "import", "coco", str(coco), "--images", str(tmp_path / "coco" / "images"),
                 "--out", str(tmp_path / "c"), "--seed", "3"]) == 0  # fmt: skip
    assert "CI object" in capsys.readouterr().out
    (kvasir / "masks" / "cju0.jpg").unlink()
    assert main(["data", "import", "folder", str(kvasir), "--class", "polyp", "--out", str(tmp_path / "k2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "cju0.jpg: no mask" in err[0]
    _no_leftovers(tmp_path, tmp_path / "k2")
