"""Official release → retarget → export → serve, at tiny scale, through the CLI.

A tiny random-init Qwen2.5-VL + CTM is saved in the release layout (HF config.json, numbered shards
+ index, bf16, no ``conceptseg_edge`` section and so no backbone: a release's CTM was trained for
SAM 3). ``train stage1 --init-from RELEASE --backbone sam2.1_hiera_t`` re-trains its CTM through a
seeded SAM2.1-tiny on ConceptWorld; the checkpoint it writes is exported (``export concept``) and
served (``segment``). The release itself is refused by the export and the torch pipeline with a
typed error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conceptseg_edge.cli import main
from conceptseg_edge.errors import CheckpointError
from conceptseg_edge.models.checkpoint import SECTION, load_checkpoint

SAM_SIZE = 128  # SAM2.1-tiny input: a multiple of 64, small enough for CPU tests
RELEASE_CTM = {"hidden_size": 128, "num_queries": 8, "depth": 1, "num_heads": 4}
ASKED_CTM = {"num_queries": 4, "depth": 2, "num_heads": 4, "mlp_ratio": 4}  # the config's; the release's wins

pytestmark = pytest.mark.usefixtures("one_thread")


def save_release(root: Path, **ctm_config) -> Path:
    """A ConceptSeg-R1-style release at ``root``: bf16 policy + CTM over >= 2 shards, backbone None."""
    from conceptseg_edge.models.checkpoint import save_checkpoint
    from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
    from conceptseg_edge.models.policy import build_policy, build_processor, tiny_policy_config
    from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
    from conceptseg_edge.router import RouterConfig

    tokenizer = train_tiny_tokenizer()
    processor = build_processor(tokenizer, max_pixels=112 * 112)
    config = tiny_policy_config(tokenizer)
    config.dtype = torch.bfloat16
    policy = build_policy(config, seed=0).to(torch.bfloat16)
    torch.manual_seed(0)
    ctm = ConceptTranslationModule(CTMConfig(**ctm_config)).to(torch.bfloat16).eval()
    save_checkpoint(root, policy, ctm, processor, RouterConfig(), None, max_shard_size="300KB")
    assert len(list(root.glob("model-*-of-*.safetensors"))) >= 2
    # as shipped: no section of ours, so the CTM's shape is read from its tensors and its head count
    # (which the shapes do not show) comes from the stage-1 config
    config = json.loads((root / "config.json").read_text())
    del config[SECTION]
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return save_release(tmp_path_factory.mktemp("release") / "ConceptSeg-R1-tiny", **RELEASE_CTM)


@pytest.fixture(scope="module")
def sam_pt(tmp_path_factory) -> Path:
    from conftest import save_seeded_checkpoint

    return save_seeded_checkpoint(tmp_path_factory.mktemp("sam") / "sam2.1_hiera_tiny.pt", "sam2.1_hiera_t", SAM_SIZE)


def retarget_config(path: Path, out: Path) -> Path:
    """train/configs/retarget.yaml scaled down: tiny ConceptWorld, a few steps, the CTM settings differ."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "train" / "configs" / "retarget.yaml").read_text())
    cfg.update(out_dir=str(out), backbone_image_size=SAM_SIZE, backbone_checkpoint=None, ctm=ASKED_CTM,
               data={"source": "world", "image_size": 64, "train_episodes": 6, "val_episodes": 3},
               lr=1e-3, batch_size=4, grad_accum=1, steps=2, eval_every=100, save_every=100, progress=False)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def retargeted(release, sam_pt, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("retarget")
    config = retarget_config(tmp / "retarget.yaml", tmp / "run")
    code = main(["train", "stage1", "--config", str(config), "--init-from", str(release),
                 "--backbone", "sam2.1_hiera_t", "--backbone-checkpoint", str(sam_pt)])
    assert code == 0
    return tmp / "run" / "checkpoint", json.loads((tmp / "run" / "stage1.json").read_text())


@pytest.mark.slow
def test_retarget_trains_only_the_released_ctm_for_sam2(release, sam_pt, retargeted):
    out, summary = retargeted
    before, after = load_checkpoint(release, ctm_num_heads=RELEASE_CTM["num_heads"]), load_checkpoint(out)
    assert after.backbone.config == "sam2.1_hiera_t" and after.backbone.image_size == SAM_SIZE
    assert Path(after.backbone.checkpoint) == sam_pt.resolve() and after.backbone.sha256
    # the policy is the release's, bit for bit and in its dtype
    policy_before, policy_after = before.policy.state_dict(), after.policy.state_dict()
    assert policy_before.keys() == policy_after.keys()
    assert all(torch.equal(policy_before[k], policy_after[k]) for k in policy_before)
    # the CTM started from the release's (its shape, not the config's) and moved
    assert after.ctm.config == before.ctm.config
    assert after.ctm.config.num_queries == RELEASE_CTM["num_queries"] and after.ctm.config.depth == RELEASE_CTM["depth"]
    assert summary["ctm"]["from"] == str(release)
    assert summary["ctm"]["overrides"] == {"num_queries": {"config": 4, "used": 8}, "depth": {"config": 2, "used": 1}}
    ctm_before, ctm_after = before.ctm.float().state_dict(), after.ctm.state_dict()
    changed = [k for k in ctm_before if not torch.equal(ctm_before[k], ctm_after[k])]
    assert "learnable_query.weight" in changed and any(k.startswith("proj_to_sam.") for k in changed), changed
    # a step of lr 1e-3 from the release's weights, not a fresh init
    assert (ctm_after["learnable_query.weight"] - ctm_before["learnable_query.weight"]).abs().max() < 0.05


@pytest.mark.slow
def test_retargeted_checkpoint_exports_and_serves(retargeted, tmp_path, sample_image, capsys):
    from PIL import Image

    out, _ = retargeted
    bundle = tmp_path / "bundle"
    assert main(["export", "concept", str(out), "--out", str(bundle)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["routes"] == ["prompt", "shortcut", "reason"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["model"] == "conceptseg(sam2.1_hiera_t)"
    # the bf16 policy's torch reference computes in float32, as the graphs do: the same completions
    parity = manifest["route_parity"]
    assert parity["reason"]["same_completion"] == 1.0 and parity["reason"]["samples"] > 0, parity
    image = tmp_path / "image.png"
    Image.fromarray(sample_image).save(image)
    mask = tmp_path / "mask.png"
    assert main(["segment", str(bundle), str(image), "--concept", "red circle", "--out", str(mask),
                 "--no-bank", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["route"] in ("shortcut", "reason")
    written = Image.open(mask)
    assert written.size == (sample_image.shape[1], sample_image.shape[0])


def test_release_is_refused_by_export_and_pipeline(release, tmp_path, capsys):
    from conceptseg_edge.export.concept import ConceptExportConfig, export_concept
    from conceptseg_edge.models.pipeline import ConceptSegPipeline

    refusal = r"not trained for a SAM2 backbone.*train stage1 .*--init-from .*--backbone"
    with pytest.raises(CheckpointError, match=refusal):
        ConceptSegPipeline.from_checkpoint(release)
    with pytest.raises(CheckpointError, match=refusal):
        export_concept(ConceptExportConfig(str(release)), tmp_path / "bundle", progress=False)
    assert main(["export", "concept", str(release), "--out", str(tmp_path / "cli")]) == 2
    assert "retarget it with" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "cli").exists()


def test_unknown_backbone_is_named_with_the_choices(release, tmp_path, capsys):
    config = retarget_config(tmp_path / "retarget.yaml", tmp_path / "run")
    assert main(["train", "stage1", "--config", str(config), "--init-from", str(release),
                 "--backbone", "sam2.1_hiera_xl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --backbone sam2.1_hiera_xl: unknown SAM2 config")
    assert all(name in err for name in ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"))
    assert not (tmp_path / "run").exists()
    # a config's SAM2 weights do not fit another --backbone: say so rather than fail on key mismatches
    cfg = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**cfg, "backbone_config": "sam2.1_hiera_l",
                                      "backbone_checkpoint": "checkpoints/sam2.1_hiera_large.pt"}))
    assert main(["train", "stage1", "--config", str(config), "--init-from", str(release), "--backbone", "sam2.1_hiera_t"]) == 2
    assert "holds sam2.1_hiera_l weights; give this SAM2's with --backbone-checkpoint" in capsys.readouterr().err
    # --init-from beside a config that already names a policy: one source, refused before any model
    config.write_text(yaml.safe_dump({**cfg, "policy_path": "checkpoints/Qwen2.5-VL-3B-Instruct"}))
    assert main(["train", "stage1", "--config", str(config), "--init-from", str(release)]) == 2
    assert "give one of init_checkpoint, policy_checkpoint, policy_path" in capsys.readouterr().err


def test_a_ctm_for_another_prompt_width_is_refused(tmp_path, capsys):
    """A CTM whose tokens are not SAM2's 256 wide cannot prompt it: named before anything is trained."""
    narrow = save_release(tmp_path / "narrow", **RELEASE_CTM, out_dim=128)
    config = retarget_config(tmp_path / "retarget.yaml", tmp_path / "run")
    assert main(["train", "stage1", "--config", str(config), "--init-from", str(narrow), "--backbone", "sam2.1_hiera_t"]) == 2
    err = capsys.readouterr().err
    assert "writes 128-wide prompt tokens, sam2.1_hiera_t takes 256-wide ones" in err, err
    assert not (tmp_path / "run").exists()
