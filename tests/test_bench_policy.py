"""Benchmark reports: typed records whose JSON keeps every key, in order, that the dict reports wrote;
the policy benchmark names every capture comparison and keeps the unfavourable ones in the table."""

from __future__ import annotations

import json

import pytest

from conceptseg_edge.benchmarks.policy import CAPTURE_SETTINGS, CAPTURE_TARGET
from conceptseg_edge.benchmarks.prompt import BenchConfig, bench_prompt_route, render_table
from conceptseg_edge.benchmarks.routes import RoutesBenchConfig, bench_routes, plot_routes, render_routes_table
from conceptseg_edge.generation import GenerationConfig

SETTINGS = ("no_supports", "with_supports")

# The JSON layout the dict-built reports wrote before they were typed (recorded from them on these
# fixtures): every key and its position. A leaf is None; a mapping is its (key, layout) pairs in order.
STATS = [(k, None) for k in ("n", "mean", "std", "p50", "p90", "p99", "min", "max", "stable")]


def series(*stages: str) -> list:
    return [(stage, STATS) for stage in (*stages, "total")]


def leaves(*keys: str) -> list:
    return [(k, None) for k in keys]


SAM2_PARTS = leaves("sam2_encoder", "sam2_decoder")
PROMPT_STAGES = ("preprocess", "encoder", "decoder", "postprocess")
PROMPT_LAYOUT = [
    *leaves("route", "bundle", "model", "image_size", "input_image_hw"),
    ("precision", SAM2_PARTS), ("manifest_sha256", SAM2_PARTS),
    *leaves("timing_scope", "provider_requested", "provider"), ("providers", SAM2_PARTS), *leaves("warmup", "runs"),
    ("runtime", series(*PROMPT_STAGES)), ("peak_rss_mb", None), ("environment", "…"),
    ("ort_session", leaves("intra_op_threads", "inter_op_threads", "spinning", "graph_optimization",
                           "cpu_mem_arena", "mem_pattern", "prepacking")),
    ("torch", series(*PROMPT_STAGES)), ("torch_weights", None),
    ("ratio_runtime_over_torch_p50", leaves(*PROMPT_STAGES, "total")), ("stable", None),
]
CAPTURE_ENTRY = [*leaves("engines", "setting", "prompt_tokens", "new_tokens", "generate_with_capture_ms",
                         "generate_then_forward_ms", "ratio", "target", "meets_target"),
                 ("samples_ms", leaves("capture", "baseline"))]
PRECISION_ROW = leaves("bundle", "precision", "provider", "prefill_ms_p50", "decode_tokens_per_s", "new_tokens")
CONCEPT_PARTS = leaves("sam2_encoder", "sam2_decoder", "ctm", "policy_vision", "policy_embed", "policy_decoder")
SAM2_STAGES = ("decoder", "encoder", "postprocess", "preprocess")  # sorted: the routes report sorts stage names
ROUTES_LAYOUT = [
    *leaves("bundle", "model", "image_size", "input_image_hw"),
    ("precision", CONCEPT_PARTS),
    *leaves("provider_requested", "provider"), ("providers", CONCEPT_PARTS), *leaves("timing_scope", "runs", "warmup"),
    ("routes", [
        ("prompt", series(*SAM2_STAGES)),
        ("shortcut_bank_hit", series("concept_tokens", *SAM2_STAGES)),
        ("shortcut_bank_miss", series("concept_tokens", *SAM2_STAGES)),
        ("reason", series("ctm", "decoder", "encoder", "policy_decode", "policy_prefill", "policy_preprocess",
                          "policy_vision", "postprocess", "preprocess")),
    ]),
    ("concepts_per_image", [("1", STATS), ("4", STATS), ("ratio_4_over_1_p50", None)]),
    ("ratio_shortcut_hit_over_prompt_p50", None),
    ("policy", [
        *leaves("concept_tokens_ms_p50", "decode_tokens_per_s"),
        ("precisions", [PRECISION_ROW + leaves("decode_speedup_vs_first"),
                        PRECISION_ROW + leaves("greedy_agreement_vs_first", "decode_speedup_vs_first")]),
        ("capture", [(f"{side}_{s}", CAPTURE_ENTRY) for side in ("runtime", "torch", "runtime_vs_torch") for s in SETTINGS]),
        *leaves("max_new_tokens", "runs"),
    ]),
    ("peak_rss_mb", None), ("environment", "…"),
    ("torch", [
        ("prompt", series(*SAM2_STAGES)),
        ("shortcut", series("concept_tokens", *SAM2_STAGES)),  # torch's policy_prefill is prefill + CTM: renamed
        ("reason", series("decoder", "encoder", "policy_generate", "postprocess", "preprocess")),
    ]),
    ("ratio_runtime_over_torch_p50", leaves("prompt", "shortcut", "reason")),
    ("stable", None),
]
ENVIRONMENT_KEYS = ["machine", "processor", "cpu_count", "os", "versions", "commit"]


def layout(value):
    """Keys and their order, recursively; the environment's tool versions vary by install, so elided."""
    if isinstance(value, dict):
        return [(k, "…" if k == "environment" else layout(v)) for k, v in value.items()]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [layout(v) for v in value]
    return None


@pytest.fixture(scope="module")
def routes(concept_bundle):
    """Every route, the policy at two 'precisions' (the same bundle twice) and the torch side, once."""
    cfg = RoutesBenchConfig(runs=1, warmup=0, compare_torch=True, generation=GenerationConfig(max_new_tokens=4),
                            compare_bundles=(str(concept_bundle),))
    return bench_routes(concept_bundle, cfg, progress=False)


def test_routes_report_json_keeps_every_key_in_place(routes, tmp_path):
    report = json.loads(json.dumps(routes.to_json()))
    assert layout(report) == ROUTES_LAYOUT
    assert list(report["environment"]) == ENVIRONMENT_KEYS
    assert report["policy"]["max_new_tokens"] == 4
    assert report["provider"] == "CPUExecutionProvider" and {r["provider"] for r in report["policy"]["precisions"]} == {"CPUExecutionProvider"}
    assert report["policy"]["concept_tokens_ms_p50"] == report["routes"]["shortcut_bank_miss"]["concept_tokens"]["p50"]
    assert report["ratio_runtime_over_torch_p50"]["shortcut"] == round(
        report["routes"]["shortcut_bank_miss"]["total"]["p50"] / report["torch"]["shortcut"]["total"]["p50"], 3)
    assert report["stable"] is None  # one run: stability not measured, and never "stable"
    assert {s["stable"] for r in report["routes"].values() for s in r.values()} == {None}
    assert "stability not measured" in render_routes_table(routes).splitlines()[0]
    table = render_routes_table(routes)
    for name, s in report["routes"].items():
        assert next(line for line in table.splitlines() if line.startswith(f"| {name} |")).split(" | ")[1] == \
            f"{s['total']['p50']:.1f}"
    png = plot_routes(routes, tmp_path / "routes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_report_json_keeps_every_key_in_place(tiny_bundle):
    typed = bench_prompt_route(tiny_bundle, BenchConfig(runs=1, warmup=0, compare_torch=True), progress=False)
    report = json.loads(json.dumps(typed.to_json()))
    assert layout(report) == PROMPT_LAYOUT
    assert list(report["environment"]) == ENVIRONMENT_KEYS
    assert report["torch_weights"] == "bundle checkpoint"
    assert report["provider_requested"] == "cpu" and set(report["providers"].values()) == {report["provider"]} == {"CPUExecutionProvider"}
    rows = render_table(typed).splitlines()
    assert rows[-1].startswith(f"| total | {report['runtime']['total']['p50']:.1f} |")


def test_every_setting_is_reported_on_each_side(routes):
    entries = routes.policy.capture
    assert set(entries) == {f"{side}_{s}" for side in ("runtime", "torch", "runtime_vs_torch") for s in SETTINGS}
    for name, entry in entries.items():
        assert entry.meets_target == (entry.ratio <= CAPTURE_TARGET), name
        assert entry.generate_with_capture_ms > 0 and entry.generate_then_forward_ms > 0
        assert len(entry.capture_ms) == len(entry.baseline_ms) == routes.policy.runs
        assert entry.to_json()["setting"] == CAPTURE_SETTINGS[entry.setting]
    for side in ("runtime", "torch"):
        # the support mosaic is a second image in the prompt
        assert entries[f"{side}_with_supports"].prompt_tokens > entries[f"{side}_no_supports"].prompt_tokens
    for setting in SETTINGS:
        # same engines: the baseline is its own generate plus the second forward, timed apart from the
        # capture run, so this ratio is measured (it was capture / (capture + forward), < 1 by
        # construction). Generate + a full forward taking less than the generate alone would be a bug.
        entry = entries[f"runtime_{setting}"]
        assert 0 < entry.ratio < 1
    cross = entries["runtime_vs_torch_no_supports"]
    assert cross.generate_with_capture_ms == entries["runtime_no_supports"].generate_with_capture_ms
    assert cross.generate_then_forward_ms == entries["torch_no_supports"].generate_then_forward_ms
    assert cross.prompt_tokens == entries["torch_no_supports"].prompt_tokens  # the same prompt on both sides


def test_table_lists_every_capture_row_and_precision(routes):
    table = render_routes_table(routes)
    for name, entry in routes.policy.capture.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert str(entry.ratio) in row and ("NOT met" in row) != entry.meets_target
    first, second = routes.policy.precisions
    assert first.greedy_agreement_vs_first is None and second.greedy_agreement_vs_first == 1.0  # the same bundle
    assert f"| {second.precision} | {second.provider} | {second.prefill_ms_p50} | {second.decode_tokens_per_s} |" in table
    assert "| reference |" in table
