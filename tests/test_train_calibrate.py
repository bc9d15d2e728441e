"""Router calibration: the τ rule on hand-made outcomes, and a real run whose taus the router then uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptseg_edge.router import RouterConfig, accept_shortcut
from conceptseg_edge.train.calibrate import CalibrateConfig, CalibrateDataConfig, Query, choose_taus, route_mix, sweep


def q(n: int, presence: float, short: float, reason: float, level: str = "CI") -> Query:
    return Query(level, n, presence, short, reason)


def test_sweep_and_choice_by_hand():
    # one word: the shortcut is as good as reasoning whenever presence is high -> skip from 0.5 up
    # two words: the shortcut is always worse by 0.5 -> never skip (tau above every presence)
    queries = [q(1, 0.9, 0.8, 0.8), q(1, 0.6, 0.7, 0.7), q(1, 0.2, 0.0, 0.9),
               q(2, 0.9, 0.2, 0.7), q(2, 0.95, 0.1, 0.6)]
    grid = (0.0, 0.5, 1.01)
    curves = sweep(queries, grid)
    # tau 0: all skip -> (0.8 + 0.7 + 0.0) / 3; tau 0.5: the third reasons -> (0.8 + 0.7 + 0.9) / 3
    assert curves[1] == [(0.0, pytest.approx(0.5), 1.0), (0.5, pytest.approx(0.8), pytest.approx(2 / 3)),
                         (1.01, pytest.approx(0.8), 0.0)]
    taus = choose_taus(curves, tolerance=0.0)
    assert taus == {1: 0.5, 2: 1.01}
    # a looser tolerance buys skips: 0.5 is within 0.35 of the best 0.8 at tau 0
    assert choose_taus(curves, tolerance=0.35)[1] == 0.0


def test_route_mix_counts_long_queries_as_reason():
    router = RouterConfig(taus={1: 0.5})
    queries = [q(1, 0.9, 1.0, 0.0), q(1, 0.1, 0.0, 1.0, level="CD")]
    mix = route_mix(queries, {"CR": 2}, router)
    assert mix["route_mix"]["all"] == {"queries": 4, "shortcut": 0.25, "reason": 0.75}
    assert mix["route_mix"]["CR"]["reason"] == 1.0 and mix["route_mix"]["CI"]["shortcut"] == 1.0
    assert mix["short_query_fg_iou"]["routed"] == 1.0


def test_config_errors():
    from conceptseg_edge.errors import InputError

    with pytest.raises(InputError, match="checkpoint"):
        CalibrateConfig().validate()
    with pytest.raises(InputError, match="tolerance"):
        CalibrateConfig(checkpoint="x", tolerance=2.0).validate()
    with pytest.raises(InputError, match="root"):
        CalibrateConfig(checkpoint="x", data=CalibrateDataConfig(source="meta")).validate()


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory) -> Path:
    """A tiny stage-1 checkpoint (random SAM2 at 64 px, one-layer policy), two training steps."""
    import dataclasses

    from conceptseg_edge.models.sam2 import build_sam2_model
    from conceptseg_edge.train.backbone import write_backbone
    from conceptseg_edge.train.stage1 import train_stage1

    import test_train_stage1 as s1

    root = tmp_path_factory.mktemp("calib")
    torch.manual_seed(0)
    write_backbone(root / "backbone.pt", build_sam2_model("conceptseg_tiny", image_size=64).model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dataclasses.replace(s1.tiny_cfg(root / "backbone.pt", root / "stage1"), steps=2, grad_accum=1)
        return train_stage1(cfg).checkpoint
    finally:
        torch.set_num_threads(threads)


def test_calibration_writes_taus_the_router_uses(stage1_checkpoint, tmp_path):
    from conceptseg_edge.cli import main
    from conceptseg_edge.models.checkpoint import load_checkpoint
    from conceptseg_edge.models.pipeline import ConceptSegPipeline

    out_ckpt = tmp_path / "calibrated"
    cfg = tmp_path / "cal.yaml"
    cfg.write_text(
        f"checkpoint: {stage1_checkpoint}\nout_checkpoint: {out_ckpt}\nout_dir: {tmp_path / 'report'}\n"
        "data: {image_size: 64, episodes: 6}\nmax_new_tokens: 4\nthreads: 1\nprogress: false\n"
        "tau_grid: [0.0, 0.5, 1.01]\n"
    )
    assert main(["train", "calibrate-router", "--config", str(cfg)]) == 0
    summary = json.loads((tmp_path / "report" / "calibrate.json").read_text())
    taus = {int(n): t for n, t in summary["taus"].items()}
    assert taus and set(taus.values()) <= {0.0, 0.5, 1.01}
    assert (tmp_path / "report" / "calibration.png").is_file()
    assert (tmp_path / "report" / "calibration.csv").read_text().startswith("n_words,tau,accuracy,skip")
    mix = summary["route_mix"]["all"]
    assert mix["shortcut"] + mix["reason"] == pytest.approx(1.0)

    # the rewritten checkpoint verifies, carries the taus, and its router acts on them
    ckpt = load_checkpoint(out_ckpt)
    assert ckpt.router.taus == taus
    assert load_checkpoint(stage1_checkpoint).router.taus == {}  # the input is left as it was
    pipeline = ConceptSegPipeline.from_checkpoint(out_ckpt)
    for n, tau in taus.items():
        assert pipeline.router.tau(n) == tau
        logit = 0.0  # presence 0.5
        assert accept_shortcut(logit, n, pipeline.router) == (0.5 >= tau)
