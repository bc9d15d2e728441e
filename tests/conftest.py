"""Shared fixtures: a seeded SAM2.1-tiny checkpoint in the official format, and bundles exported from it.

Exports are session-scoped: each costs seconds, and many tests only read the result. Tests that
tamper with a bundle copy it first (``bundle_copy``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

# One definition, shared with the scale benchmark: a random-init SAM2 saved like the official .pt, so
# both the export and the torch reference load the same weights through the real checkpoint code.
from conceptseg_edge.benchmarks.scale import save_seeded_checkpoint  # noqa: F401  (tests import it from here)

# Only tests marked trt/gpu may skip under `make test` (see strict_skips.py).
pytest_plugins = ["strict_skips"]

TEST_IMAGE_SIZE = 512  # tiny at 512 keeps the suite fast; the demo exports at the default 1024


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_seeded_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt", "sam2.1_hiera_t", TEST_IMAGE_SIZE)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_sam2(SAM2ExportConfig("sam2.1_hiera_t", str(tiny_checkpoint), image_size=TEST_IMAGE_SIZE), out, progress=False)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    from conceptseg_edge.preprocess import load_image

    return load_image(Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "sample.png")


@pytest.fixture(scope="session")
def torch_reference(tiny_checkpoint):
    from conceptseg_edge.models.sam2 import SAM2Reference, build_sam2_model

    return SAM2Reference(build_sam2_model("sam2.1_hiera_t", tiny_checkpoint, TEST_IMAGE_SIZE).model)


CONCEPT_IMAGE_SIZE = 256  # SAM2 input of the concept-bundle fixture


@pytest.fixture(scope="session")
def concept_checkpoint(tmp_path_factory) -> Path:
    """A tiny ConceptSeg checkpoint: tiny Qwen2.5-VL policy + CTM + a seeded SAM2.1-tiny backbone."""
    import torch

    from conceptseg_edge.models.checkpoint import BackboneSpec, save_checkpoint
    from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
    from conceptseg_edge.models.policy import build_policy, build_processor, tiny_policy_config
    from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
    from conceptseg_edge.router import RouterConfig

    root = tmp_path_factory.mktemp("concept")
    sam = save_seeded_checkpoint(root / "sam2.pt", "sam2.1_hiera_t", CONCEPT_IMAGE_SIZE)
    tokenizer = train_tiny_tokenizer()
    processor = build_processor(tokenizer, max_pixels=112 * 112)
    policy = build_policy(tiny_policy_config(tokenizer), seed=0)
    torch.manual_seed(0)
    ctm = ConceptTranslationModule(CTMConfig(hidden_size=128, num_heads=4)).eval()
    backbone = BackboneSpec("sam2.1_hiera_t", str(sam), image_size=CONCEPT_IMAGE_SIZE)
    return save_checkpoint(root / "ckpt", policy, ctm, processor, RouterConfig(), backbone)


@pytest.fixture(scope="session")
def concept_bundle(tmp_path_factory, concept_checkpoint) -> Path:
    from conceptseg_edge.export.concept import ConceptExportConfig, export_concept

    out = tmp_path_factory.mktemp("bundles") / "concept"
    export_concept(ConceptExportConfig(str(concept_checkpoint)), out, progress=False)
    return out


@pytest.fixture(scope="session")
def video_bundle(tmp_path_factory) -> Path:
    """ConceptSeg-Tiny's SAM2 layout at 128 px (the smallest this repo exports), seeded, exported with
    ``--video``; its object-score head biased to "present" (+8): a random head says "absent", and SAM2
    then blanks every tracked mask, which would make any mask comparison vacuous."""
    import torch

    from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2
    from conceptseg_edge.models.sam2 import build_sam2_model

    root = tmp_path_factory.mktemp("video-bundle")
    torch.manual_seed(0)
    sam = build_sam2_model("conceptseg_tiny", None, 128).model
    with torch.no_grad():
        sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 8.0
    torch.save({"model": sam.state_dict()}, root / "sam2.pt")
    export_sam2(SAM2ExportConfig("conceptseg_tiny", str(root / "sam2.pt"), image_size=128, video=True), root / "bundle", progress=False)
    return root / "bundle"


@pytest.fixture(scope="session")
def concept_video_bundle(tmp_path_factory, concept_checkpoint) -> Path:
    """The concept fixture's checkpoint exported with ``--video``: concept routes and the tracker's parts."""
    from conceptseg_edge.export.concept import ConceptExportConfig, export_concept

    out = tmp_path_factory.mktemp("bundles") / "concept-video"
    export_concept(ConceptExportConfig(str(concept_checkpoint), video=True), out, progress=False)
    return out


@pytest.fixture
def one_thread():
    """Torch on one thread for a training test: on two shared cores more threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
