"""The concept routes at real width: a bundle whose policy has Qwen2.5-VL-3B's architecture, full depth.

    python -m conceptseg_edge.benchmarks.real_concept --out DIR [--preset 3b] [--runs 2]

Speed does not depend on the weights' values, so the policy is random-init (as ``scale_policy``
builds it: bf16 shards in the release layout, an fp16 CTM of the same width) beside a seeded
SAM2.1 checkpoint at ``--image-size``. Each step runs in a child process of its own, so its peak RSS
(the child's ``VmHWM``) is that step's alone and no two policies share a memory budget:

1. ``build``: the checkpoint (``scale_policy.build_checkpoint``) paired with the SAM2 (``BackboneSpec``);
2. ``export``: ``export concept --stream-policy --no-route-parity`` into ``DIR/bundle-fp32``. Every
   graph's own parity check runs; the route comparison with the torch pipeline does not (it would
   hold the fp32 torch policy beside the runtime's, ~27 GB at 3B);
3. ``quantize-int8`` / ``quantize-int4``: ``speed_bundle``, the fp32 bundle with only its policy
   decoder quantized (``export/quantize.quantize_part``, the tool ``export concept`` uses), other
   files hard-linked. These are speed-only bundles: the quantized-parity gate is not run (a
   random-init 3B decoder fails it at INT4, docs/scale.md) and their manifests carry no
   ``quantized_parity``, so nothing can mistake them for validated exports;
4. ``time-<precision>``: ``bench_routes`` on each bundle without torch: prompt, shortcut (bank hit and
   miss), reason, 4 concepts vs 1, the policy's prefill and decode rate; capture vs generate-then-
   forward (same engines: a ratio of one policy's own calls) on the ``--capture`` precisions' bundles.

Output: ``DIR/real_concept.json`` (every step's result, seconds and peak RSS, the targets met or not),
``DIR/real_concept.md`` (both rewritten after each step) and ``DIR/real_concept.png``. Targets (issue 14): INT8 decode >= 1.8x fp32 tokens/s, INT4 >= 2.5x;
capture <= 0.6x re-forward; 4 concepts <= 1.3x one; shortcut (bank hit) <= 1.10x prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conceptseg_edge.benchmarks.scale import machine
from conceptseg_edge.benchmarks.scale_policy import PRESETS, build_checkpoint, dir_bytes, scaled
from conceptseg_edge.benchmarks.stats import own_peak_rss_mib, peak_file, run_step
from conceptseg_edge.fileio import write_json, write_text

PRECISIONS = ("fp32", "int8", "int4")
#: Decode-rate targets over the fp32 bundle's.
DECODE_TARGETS = {"int8": 1.8, "int4": 2.5}
CAPTURE_LIMIT = 0.6
CONCEPTS_LIMIT = 1.3
SHORTCUT_LIMIT = 1.10


def speed_bundle(fp32: Path, out: Path, precision: str) -> dict[str, Any]:
    """``fp32``'s bundle with its policy decoder quantized to ``precision``, written to ``out``
    atomically; every other file is a hard link. No quantized-parity gate (see the module doc)."""
    from conceptseg_edge.export.external import data_files, data_path
    from conceptseg_edge.export.quantize import quantize_part
    from conceptseg_edge.fileio import staged_dir
    from conceptseg_edge.manifest import MANIFEST_NAME, read_manifest, write_manifest

    manifest = read_manifest(fp32)
    part = manifest.part("policy_decoder")
    replaced = {part.file, data_path(fp32 / part.file).name, MANIFEST_NAME}
    with staged_dir(out, MANIFEST_NAME, "bundle") as staging:
        for item in fp32.iterdir():
            if item.name in replaced:
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name, copy_function=os.link)
            else:
                os.link(item, staging / item.name)
        quantized = quantize_part(part, fp32, staging, precision)
        files = {k: v for k, v in manifest.files.items() if k not in replaced} | data_files(staging, [quantized])
        write_manifest(staging, dataclasses.replace(manifest.with_parts(policy_decoder=quantized), files=files,
                                                    route_parity={}))
    return {"decoder_bytes": sum(f.stat().st_size for f in out.glob(f"{part.file}*"))}


def _time(bundle: Path, runs: int, warmup: int, max_new_tokens: int, capture: bool) -> dict[str, Any]:
    """``bench_routes`` on ``bundle`` (no torch), reduced to what the targets read, plus its JSON."""
    from conceptseg_edge.benchmarks.routes import RoutesBenchConfig, bench_routes
    from conceptseg_edge.generation import GenerationConfig

    cfg = RoutesBenchConfig(runs=runs, warmup=warmup, compare_torch=False, capture=capture,
                            generation=GenerationConfig(max_new_tokens=max_new_tokens))
    report = bench_routes(bundle, cfg, progress=False)
    row = report.policy.precisions[0]
    return {
        "precision": row.precision, "provider": row.provider,
        "prefill_ms_p50": row.prefill_ms_p50, "decode_tokens_per_s": row.decode_tokens_per_s, "new_tokens": row.new_tokens,
        "route_total_ms_p50": {name: series.total.p50 for name, series in report.routes.items()},
        "shortcut_hit_over_prompt": report.ratio_shortcut_hit_over_prompt_p50,
        "concepts_4_over_1": report.concepts_per_image.ratio_4_over_1_p50,
        "capture": {name: entry.to_json() for name, entry in report.policy.capture.items()},
        "stable": report.stable,
        "routes_report": report.to_json(),
    }


def targets(steps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each issue-14 target for the policy half: its measured ratio and whether it is met."""
    out: list[dict[str, Any]] = []
    fp32 = steps.get("time-fp32", {})

    def add(name: str, ratio: float | None, limit: float, at_least: bool = False) -> None:
        met = None if ratio is None else (ratio >= limit if at_least else ratio <= limit)
        out.append({"target": name, "limit": limit, "ratio": ratio, "met": met})

    for precision, limit in DECODE_TARGETS.items():
        rate, base = steps.get(f"time-{precision}", {}).get("decode_tokens_per_s"), fp32.get("decode_tokens_per_s")
        add(f"{precision} decode tok/s / fp32 >= {limit}", round(rate / base, 3) if rate and base else None, limit, at_least=True)
    for precision in PRECISIONS:
        for entry in steps.get(f"time-{precision}", {}).get("capture", {}).values():
            add(f"{precision} capture / generate+forward ({entry['setting']}) <= {CAPTURE_LIMIT}", entry["ratio"], CAPTURE_LIMIT)
    add(f"4 concepts / 1 <= {CONCEPTS_LIMIT}", fp32.get("concepts_4_over_1"), CONCEPTS_LIMIT)
    add(f"shortcut (bank hit) / prompt <= {SHORTCUT_LIMIT}", fp32.get("shortcut_hit_over_prompt"), SHORTCUT_LIMIT)
    return out


def render_markdown(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        f"## Concept routes, {cfg['preset']} policy architecture ({report['widths']['num_layers']} decoder layers, "
        f"{report['widths']['vision_depth']} vision blocks), SAM2 {cfg['sam2']} @ {cfg['image_size']}",
        "",
        f"Run {report['date']} at commit {m.get('commit')}{' (dirty)' if m.get('dirty') else ''}; {cfg['runs']} runs after "
        f"{cfg['warmup']} warm-up; max_new_tokens {cfg['max_new_tokens']}; policy images capped at {cfg['max_pixels']} px.",
        "Random-init weights (speed only); quantized bundles are speed-only (no parity gate).",
        "",
        "| bundle | prefill p50 ms | decode tok/s | new tokens | prompt ms | shortcut hit ms | reason ms | peak RSS GiB | provider |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for precision in cfg["precisions"]:
        t = report["steps"].get(f"time-{precision}", {})
        if "error" in t:
            lines.append(f"| {precision} | failed: {t['error']} ||||||||")
            continue
        totals = t.get("route_total_ms_p50", {})
        lines.append(f"| {precision} | {t.get('prefill_ms_p50')} | {t.get('decode_tokens_per_s')} | {t.get('new_tokens')} | "
                     f"{totals.get('prompt')} | {totals.get('shortcut_bank_hit')} | {totals.get('reason')} | "
                     f"{t.get('peak_rss_gib')} | {t.get('provider')} |")
    lines += ["", "| target | ratio | met |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['ratio']} | {'-' if t['met'] is None else ('yes' if t['met'] else 'no')} |"
              for t in report["targets"]]
    lines += ["", "| step | seconds | peak RSS GiB |", "|---|---:|---:|"]
    lines += [f"| {name} | {s.get('seconds', 'reused' if 'reused' in s else '-')} | {s.get('peak_rss_gib', '-')} |"
              for name, s in report["steps"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], png: Path) -> Path:
    """Left: prefill seconds and decode tokens/s per precision. Right: capture / generate-then-forward
    per precision and prompt, against the 0.6 target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from conceptseg_edge.visualize import save_figure

    timed = {p: report["steps"].get(f"time-{p}", {}) for p in report["config"]["precisions"]}
    timed = {p: t for p, t in timed.items() if "error" not in t and t}
    fig, (speed_ax, capture_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(timed))
    speed_ax.bar(x - 0.2, [t["prefill_ms_p50"] / 1e3 for t in timed.values()], width=0.4, label="prefill p50 (s)")
    speed_ax.bar(x + 0.2, [t["decode_tokens_per_s"] or 0.0 for t in timed.values()], width=0.4, label="decode tokens/s")
    speed_ax.set_xticks(x, list(timed))
    speed_ax.set_title(f"{report['config']['preset']} policy, {report['machine']['cpus']} CPUs")
    speed_ax.legend(fontsize=8)
    settings = sorted({name for t in timed.values() for name in t.get("capture", {})})
    for i, name in enumerate(settings):
        ratios = [t.get("capture", {}).get(name, {}).get("ratio", 0.0) for t in timed.values()]
        capture_ax.bar(x + (i - (len(settings) - 1) / 2) * 0.35, ratios, width=0.35, label=name.removeprefix("runtime_"))
    capture_ax.axhline(CAPTURE_LIMIT, color="k", linestyle="--", linewidth=1, label=f"target {CAPTURE_LIMIT}")
    capture_ax.set_xticks(x, list(timed))
    capture_ax.set_title("capture / generate then forward (0: not timed)")
    capture_ax.legend(fontsize=8)
    return save_figure(fig, png)


def _step(args: argparse.Namespace) -> dict[str, Any]:
    """One step, in this (child) process."""
    out, step = args.out, args.step
    if step == "build":
        from conceptseg_edge.benchmarks.scale import save_seeded_checkpoint
        from conceptseg_edge.models.checkpoint import BackboneSpec

        pt = save_seeded_checkpoint(out / f"{args.sam2}.pt", args.sam2, args.image_size)
        widths = scaled(PRESETS[args.preset], num_layers=args.layers, vision_depth=args.vision_depth)
        return build_checkpoint(out, widths, args.max_pixels, BackboneSpec(args.sam2, str(pt), image_size=args.image_size))
    if step == "export":
        from conceptseg_edge.export.concept import ConceptExportConfig, export_concept

        export_concept(ConceptExportConfig(str(out / "checkpoint"), stream_policy=True, route_parity=False),
                       out / "bundle-fp32", progress=False)
        return {"bundle_bytes": dir_bytes(out / "bundle-fp32")}
    if step.startswith("quantize-"):
        precision = step.removeprefix("quantize-")
        return speed_bundle(out / "bundle-fp32", out / f"bundle-{precision}", precision)
    precision = step.removeprefix("time-")
    return _time(out / f"bundle-{precision}", args.runs, args.warmup, args.max_new_tokens, capture=precision in args.capture)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's; fewer only for a smoke run)")
    parser.add_argument("--vision-depth", type=int, help="vision blocks (default: the preset's 32)")
    parser.add_argument("--sam2", default="sam2.1_hiera_t", help="SAM2 config of the bundle")
    parser.add_argument("--image-size", type=int, default=1024, help="SAM2 input resolution")
    parser.add_argument("--max-pixels", type=int, default=224 * 224,
                        help="the policy processor's image cap (the paper's is 360000: longer prompts, slower prefill)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--capture", nargs="*", choices=PRECISIONS, default=list(PRECISIONS),
                        help="precisions whose bundle also times capture vs generate-then-forward (two prompts, "
                             "3 generations each per run: at 3B fp32 ~7 min)")
    parser.add_argument("--reuse", action="store_true", help="keep a step's output from an earlier run (checkpoint, bundles)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: one step, in a child process
    args = parser.parse_args(argv)
    if args.step:
        try:
            print(json.dumps(_step(args)))
        finally:  # a failed step's peak counts too
            peak_file(args.out, args.step).write_text(str(own_peak_rss_mib()))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    widths = scaled(PRESETS[args.preset], num_layers=args.layers, vision_depth=args.vision_depth)
    common = ["--out", str(args.out), "--preset", args.preset, "--sam2", args.sam2, "--image-size", str(args.image_size),
              "--max-pixels", str(args.max_pixels), "--runs", str(args.runs), "--warmup", str(args.warmup),
              "--max-new-tokens", str(args.max_new_tokens), "--capture", *args.capture]
    common += [f for flag, v in (("--layers", args.layers), ("--vision-depth", args.vision_depth)) if v is not None
               for f in (flag, str(v))]
    produced = {"build": args.out / "checkpoint" / "config.json", "export": args.out / "bundle-fp32" / "manifest.json"}
    produced |= {f"quantize-{p}": args.out / f"bundle-{p}" / "manifest.json" for p in PRECISIONS[1:]}
    plan = ["build", "export", *(f"quantize-{p}" for p in args.precisions if p != "fp32"), *(f"time-{p}" for p in args.precisions)]
    report: dict[str, Any] = {
        "profile": "real_concept", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "config": {"preset": args.preset, "sam2": args.sam2, "image_size": args.image_size, "max_pixels": args.max_pixels,
                   "precisions": args.precisions, "capture": args.capture, "runs": args.runs, "warmup": args.warmup, "max_new_tokens": args.max_new_tokens},
        "widths": dataclasses.asdict(widths), "steps": {},
    }
    for step in plan:
        if args.reuse and step in produced and produced[step].is_file():
            report["steps"][step] = {"reused": str(produced[step].parent)}
        elif any("error" in report["steps"].get(s, {}) for s in ("build", "export")):
            report["steps"][step] = {"error": "not run: an earlier step failed"}
        else:
            report["steps"][step] = run_step(__spec__.name, [*common, "--step", step], step, args.out / f"{step}.log", args.out)
        print(json.dumps({step: {k: v for k, v in report["steps"][step].items() if k != "routes_report"}}), flush=True)
        report["targets"] = targets(report["steps"])
        write_json(args.out / "real_concept.json", report)
        write_text(args.out / "real_concept.md", render_markdown(report))
    plot(report, args.out / "real_concept.png")
    return 0 if all("error" not in s for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
