"""Qwen2.5-VL policies at real widths: the released architectures' shapes, and a memory/size measurement.

``QWEN25_VL_3B`` / ``QWEN25_VL_7B`` hold the released configs' shapes (text: hidden, layers, heads,
KV heads, MLP width; vision: 32 blocks of width 1280 with 16 heads, SwiGLU width 3420, window
attention on 112-pixel windows except the full-attention blocks 7/15/23/31; M-RoPE sections
[16, 24, 24] of the 128-wide heads). ``QWEN25_05B_LIKE`` / ``QWEN25_15B_LIKE`` are Qwen2.5-0.5B's / -1.5B's language models under the
same vision tower: there is no such Qwen2.5-VL, they are the small points of the memory curve.
``scaled(widths, ...)`` cuts depth (tests keep full widths at 2 decoder layers and a few vision
blocks); ``policy_config`` turns a ``PolicyWidths`` into a ``Qwen2_5_VLConfig`` wired to a tokenizer.
The vocabulary is the tokenizer's (a locally trained one here; the release's 151936/152064 rows only
add to the embedding and LM head, whose sizes are reported separately).

Run as a module, it measures what one user-side export costs:

    python -m conceptseg_edge.benchmarks.scale_policy --preset 3b --out runs/scale-3b

Each step runs in a child process of its own so its peak RSS (the child's ``VmHWM``) is
that step's alone: ``build`` (random init in bf16, saved with ``models/checkpoint.py``'s
``save_checkpoint`` in the release layout, 4 GB shards, next to an fp16 CTM of the same width), then
``export-<precision>`` for fp32 / int8 / int4 (``export_policy_streamed``: decoder layers streamed
from the memory-mapped shards, weights written to ONNX external data; the graphs are deleted after
their sizes are read unless ``--keep``). The result (seconds, peak RSS, file sizes, parity, the
commit) is written to ``<out>/scale_policy.json`` and printed. A step that fails (the INT4 gate, say)
is recorded with its error and its peak RSS, not hidden.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptseg_edge.benchmarks.scale import machine
from conceptseg_edge.benchmarks.stats import own_peak_rss_mib, peak_file, run_step


@dataclass(frozen=True)
class PolicyWidths:
    """The shape of a Qwen2.5-VL policy (vocabulary aside: that comes from the tokenizer)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_heads: int = 16
    vision_intermediate_size: int = 3420
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 112


#: Qwen2.5-VL-3B-Instruct's config.json shapes.
QWEN25_VL_3B = PolicyWidths(2048, 36, 16, 2, 11008, tie_word_embeddings=True)
#: Qwen2.5-VL-7B-Instruct's config.json shapes.
QWEN25_VL_7B = PolicyWidths(3584, 28, 28, 4, 18944, tie_word_embeddings=False)
#: Qwen2.5-0.5B's language model (896 wide, 24 layers, 14/2 heads) under the same vision tower.
QWEN25_05B_LIKE = PolicyWidths(896, 24, 14, 2, 4864, tie_word_embeddings=True)
#: Qwen2.5-1.5B's language model (1536 wide, 28 layers, 12/2 heads) under the same vision tower.
QWEN25_15B_LIKE = PolicyWidths(1536, 28, 12, 2, 8960, tie_word_embeddings=True)
PRESETS = {"0.5b": QWEN25_05B_LIKE, "1.5b": QWEN25_15B_LIKE, "3b": QWEN25_VL_3B, "7b": QWEN25_VL_7B}
PRECISIONS = ("fp32", "int8", "int4")
#: Shard size of the saved checkpoint (what Qwen2.5-VL releases use).
SHARD_SIZE = "4GB"


def scaled(widths: PolicyWidths, *, num_layers: int | None = None, vision_depth: int | None = None,
           fullatt_block_indexes: tuple[int, ...] | None = None) -> PolicyWidths:
    """``widths`` with fewer layers; widths, heads and windows unchanged.

    Without ``fullatt_block_indexes``, a cut vision tower keeps the release's pattern (every
    eighth block full) where it still reaches, and always ends on a full-attention block.
    """
    depth = widths.vision_depth if vision_depth is None else vision_depth
    if fullatt_block_indexes is None:
        fullatt_block_indexes = tuple(sorted({i for i in widths.fullatt_block_indexes if i < depth} | {depth - 1}))
    return dataclasses.replace(
        widths,
        num_layers=widths.num_layers if num_layers is None else num_layers,
        vision_depth=depth,
        fullatt_block_indexes=fullatt_block_indexes,
    )


def policy_config(tokenizer, widths: PolicyWidths):
    """A ``Qwen2_5_VLConfig`` of ``widths`` for ``tokenizer`` (``models/policy.py``'s token wiring)."""
    from conceptseg_edge.models.policy import tiny_policy_config

    cfg = tiny_policy_config(
        tokenizer,
        hidden_size=widths.hidden_size,
        num_layers=widths.num_layers,
        num_heads=widths.num_heads,
        num_kv_heads=widths.num_kv_heads,
        intermediate_size=widths.intermediate_size,
        vision_depth=widths.vision_depth,
        vision_hidden_size=widths.vision_hidden_size,
        vision_heads=widths.vision_heads,
        tie_word_embeddings=widths.tie_word_embeddings,
    )
    # What tiny_policy_config does not take: the vision MLP width and the full-attention blocks.
    cfg.vision_config.intermediate_size = widths.vision_intermediate_size
    cfg.vision_config.fullatt_block_indexes = list(widths.fullatt_block_indexes)
    cfg.vision_config.window_size = widths.window_size
    return cfg


# ----------------------------------------------------------------------------- the measurement


def build_checkpoint(out: Path, widths: PolicyWidths, max_pixels: int, backbone=None) -> dict[str, Any]:
    """Random-init policy (bf16, as released) + fp16 CTM of the same width, saved in the release
    layout (``SHARD_SIZE`` shards + index) at ``out/checkpoint``; ``backbone`` (a ``BackboneSpec``)
    pairs it with a SAM2 for ``export concept``."""
    import torch

    from conceptseg_edge.models.checkpoint import save_checkpoint
    from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
    from conceptseg_edge.models.policy import build_policy, build_processor
    from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
    from conceptseg_edge.router import RouterConfig

    processor = build_processor(train_tiny_tokenizer(), max_pixels=max_pixels)
    policy = build_policy(policy_config(processor.tokenizer, widths), seed=0, dtype=torch.bfloat16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ctm = ConceptTranslationModule(CTMConfig(hidden_size=widths.hidden_size)).half().eval()
    save_checkpoint(out / "checkpoint", policy, ctm, processor, RouterConfig(), backbone, overwrite=True,
                    max_shard_size=SHARD_SIZE)
    return {
        "policy_params": sum(p.numel() for p in policy.parameters()),
        "vision_params": sum(p.numel() for p in policy.model.visual.parameters()),
        "ctm_params": sum(p.numel() for p in ctm.parameters()),
        "checkpoint_bytes": dir_bytes(out / "checkpoint"),
    }


def _export(out: Path, precision: str, quant_tokens: int, keep: bool) -> dict[str, Any]:
    """Stream the checkpoint's policy graphs at ``precision`` into ``out/policy-<precision>``
    (``export_policy_streamed``); the graphs are deleted after measuring unless ``keep``."""
    import shutil

    from conceptseg_edge.export.external import data_files
    from conceptseg_edge.export.policy import export_policy_streamed
    from conceptseg_edge.generation import GenerationConfig

    target = out / f"policy-{precision}"
    try:
        parts = export_policy_streamed(out / "checkpoint", target, precision=precision,
                                       generation=GenerationConfig(max_new_tokens=quant_tokens))
    except BaseException:
        if not keep:  # a refused export (the INT4 gate) leaves its graphs: GBs at full size
            shutil.rmtree(target, ignore_errors=True)
        raise
    files = [p.file for p in parts.values()] + list(data_files(target, parts.values()))
    result: dict[str, Any] = {"files": {f: (target / f).stat().st_size for f in files}}
    for name, part in parts.items():
        if part.parity is not None:  # the worst output of the graph (every KV entry is one)
            result[f"{name}_max_abs_diff"] = max(part.parity.max_abs_diff.values())
        if part.quantized_parity is not None:
            result[f"{name}_quantized"] = part.quantized_parity.measures()
    result["bundle_bytes"] = dir_bytes(target)
    if not keep:
        shutil.rmtree(target)
    return result


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--vision-depth", type=int, help="vision blocks (default: the preset's 32)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--max-pixels", type=int, default=224 * 224,
                        help="the processor's cap, which sizes the vision parity cases (default 224*224)")
    parser.add_argument("--quant-tokens", type=int, default=8,
                        help="new tokens per prompt in the quantized decoder's check (each streams every layer)")
    parser.add_argument("--keep", action="store_true", help="keep the exported graphs (default: sizes only)")
    parser.add_argument("--reuse-checkpoint", action="store_true",
                        help="skip the build when <out>/checkpoint exists (its build figures are then not measured)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: one step, in a child process
    args = parser.parse_args(argv)
    widths = scaled(PRESETS[args.preset], num_layers=args.layers, vision_depth=args.vision_depth)
    if args.step:
        try:
            if args.step == "build":
                print(json.dumps(build_checkpoint(args.out, widths, args.max_pixels)))
            else:
                print(json.dumps(_export(args.out, args.step.removeprefix("export-"), args.quant_tokens, args.keep)))
        finally:  # a failed step's peak counts too
            peak_file(args.out, args.step).write_text(str(own_peak_rss_mib()))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--preset", args.preset, "--out", str(args.out), "--max-pixels", str(args.max_pixels),
              "--quant-tokens", str(args.quant_tokens), *(["--keep"] if args.keep else [])]
    if args.layers is not None:
        common += ["--layers", str(args.layers)]
    if args.vision_depth is not None:
        common += ["--vision-depth", str(args.vision_depth)]
    report: dict[str, Any] = {"widths": dataclasses.asdict(widths), "max_pixels": args.max_pixels,
                              "quant_tokens": args.quant_tokens, "machine": machine(), "steps": {}}
    if args.reuse_checkpoint and (args.out / "checkpoint" / "config.json").is_file():
        report["steps"]["build"] = {"reused": str(args.out / "checkpoint"),
                                    "checkpoint_bytes": dir_bytes(args.out / "checkpoint")}
    else:
        report["steps"]["build"] = run_step(__spec__.name, [*common, "--step", "build"], "build", args.out / "build.log", args.out)
    print(json.dumps({"build": report["steps"]["build"]}), flush=True)
    if "error" not in report["steps"]["build"]:
        for precision in args.precisions:
            step = run_step(__spec__.name, [*common, "--step", f"export-{precision}"], f"export-{precision}",
                            args.out / f"export-{precision}.log", args.out)
            report["steps"][f"export-{precision}"] = step
            print(json.dumps({f"export-{precision}": step}), flush=True)
    (args.out / "scale_policy.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in s for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
