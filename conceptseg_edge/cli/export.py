"""``conceptseg-edge export sam2|sam3|concept|check|tensorrt ...``."""

from __future__ import annotations

import argparse
import dataclasses
import json

# Torch-free modules: the choices are read while arguments are parsed, for every command.
from conceptseg_edge.export.parts import PRECISIONS, WEIGHT_STORAGES
from conceptseg_edge.export.qdq import QDQ_PRECISIONS, QdqConfig, export_qdq
from conceptseg_edge.export.sam3 import SAM3_VARIANTS, Sam3ExportConfig
from conceptseg_edge.export.tensorrt import TRT_PRECISIONS, TrtBuildConfig
from conceptseg_edge.manifest import HARDWARE_COMPATIBILITY
from conceptseg_edge.models.sam2_variants import DEFAULT_CONFIG, SAM2_CONFIGS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export checkpoints to a validated ONNX bundle")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    sam2 = kinds.add_parser("sam2", help="SAM 2.1 image encoder + prompt/concept decoder")
    sam2.add_argument("--config", default=DEFAULT_CONFIG, choices=list(SAM2_CONFIGS), help="the SAM2 variant")
    sam2.add_argument("--checkpoint", default=None, help="official SAM 2.1 .pt (random init without it)")
    sam2.add_argument("--out", required=True, help="bundle directory to write")
    sam2.add_argument("--opset", type=int, default=17)
    sam2.add_argument("--image-size", type=int, default=1024)
    sam2.add_argument("--weight-storage", default="fp32", choices=list(WEIGHT_STORAGES),
                      help="store large weights as fp16 with a Cast back (half the file; computes in fp32)")
    sam2.add_argument("--video", action="store_true",
                      help="also export the video path (memory encoder, memory attention, video decoder) for `track`")
    sam2.set_defaults(func=_export_sam2)

    sam3 = kinds.add_parser("sam3", help="SAM 3 vision encoder + text encoder + grounding head (text and concept tokens)")
    sam3.add_argument("--variant", default="sam3", choices=list(SAM3_VARIANTS),
                      help="sam3: the release (840M); sam3_small: the same modules at test size")
    sam3.add_argument("--checkpoint", default=None, help="official sam3.pt (random init without it)")
    sam3.add_argument("--out", required=True, help="bundle directory to write")
    sam3.add_argument("--opset", type=int, default=17)
    sam3.add_argument("--weight-storage", default="fp32", choices=list(WEIGHT_STORAGES),
                      help="store large weights as fp16 with a Cast back (half the file; computes in fp32)")
    sam3.add_argument("--concept-slots", type=int, default=Sam3ExportConfig.concept_slots,
                      help="concept tokens the head takes (static; fewer are padded by mask, 0 = text prompt only)")
    sam3.set_defaults(func=_export_sam3)

    concept = kinds.add_parser("concept", help="ConceptSeg checkpoint → bundle with all three routes")
    concept.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    concept.add_argument("--out", required=True, help="bundle directory to write")
    concept.add_argument("--policy-precision", default="fp32", choices=PRECISIONS,
                         help="policy decoder weights: fp32, int8 (dynamic) or int4 (MatMulNBits, weight-only)")
    concept.add_argument("--opset", type=int, default=17)
    concept.add_argument("--weight-storage", default="fp32", choices=list(WEIGHT_STORAGES),
                         help="every fp32 graph (SAM2, CTM, policy; not a quantized decoder): store large weights "
                              "as fp16 with a Cast back (half the file; computes in fp32)")
    concept.add_argument("--stream-policy", action="store_true",
                         help="export the policy layer by layer from the checkpoint's shards into ONNX external data "
                              "(policies larger than memory or than 2 GB per graph: Qwen2.5-VL-3B/7B); fp32 storage")
    concept.add_argument("--no-route-parity", dest="route_parity", action="store_false",
                         help="skip comparing the shortcut and reason routes with the torch pipeline (it holds the fp32 "
                              "torch policy beside the runtime's: ~27 GB at 3B); the manifest's route_parity stays empty")
    concept.add_argument("--video", action="store_true",
                         help="also export SAM2's video path (memory encoder, memory attention, video decoder) for `track`")
    concept.add_argument("--backbone", choices=SAM3_VARIANTS, default=None,
                         help="pair the CTM with SAM 3 instead of the checkpoint's SAM2 (an official release: its CTM "
                              "prompts SAM 3; routes shortcut = SAM 3's text prompt, reason = policy → CTM → SAM 3)")
    concept.add_argument("--backbone-checkpoint", default=None,
                         help="SAM 3 weights (the official sam3.pt) for --backbone; omitted = random init")
    concept.set_defaults(func=_export_concept)

    check = kinds.add_parser("check", help="check a bundle's ONNX graphs against TensorRT's documented ONNX parser "
                                           "support; exit 1 on any violation")
    check.add_argument("bundle", help="bundle directory (its ONNX parts are checked; engines are left out)")
    check.set_defaults(func=_check)

    qdq_help = {f.name: f.metadata["help"] for f in dataclasses.fields(QdqConfig)}
    qdq = kinds.add_parser("qdq", help="explicit quantization: Q/DQ ONNX graphs for TensorRT INT8/FP8, measured on "
                                       "ONNX Runtime CPU (a part below its floor stays fp32)")
    qdq.add_argument("bundle", help="fp32 bundle directory")
    qdq.add_argument("--out", required=True, help="Q/DQ bundle directory to write")
    qdq.add_argument("--precision", default="int8", choices=QDQ_PRECISIONS, help=qdq_help["precision"])
    qdq.add_argument("--calib", default=QdqConfig.calibration, metavar="DIR|world:N", help=qdq_help["calibration"])
    qdq.add_argument("--held-out", type=int, default=QdqConfig.held_out, metavar="N", help=qdq_help["held_out"])
    qdq.add_argument("--parts", nargs="+", default=None, metavar="PART", help=qdq_help["parts"])
    qdq.set_defaults(func=_export_qdq)

    trt_help = {f.name: f.metadata["help"] for f in dataclasses.fields(TrtBuildConfig)}
    tensorrt = kinds.add_parser("tensorrt", help="build one TensorRT engine per part, with its trtexec recipe")
    tensorrt.add_argument("bundle", help="ONNX bundle directory (an 'export qdq' bundle for int8/best)")
    tensorrt.add_argument("--out", required=True, help="engine bundle directory to write")
    tensorrt.add_argument("--precision", default="fp16", choices=TRT_PRECISIONS, help=trt_help["precision"])
    tensorrt.add_argument("--calib", default=None, metavar="DIR|world:N", help=trt_help["calib"])
    tensorrt.add_argument("--profile", action="append", default=[], metavar="PART:INPUT=MIN,OPT,MAX", help=trt_help["profiles"])
    tensorrt.add_argument("--workspace", type=float, default=None, metavar="GB", help=trt_help["workspace_gb"])
    tensorrt.add_argument("--timing-cache", default=None, metavar="FILE", help=trt_help["timing_cache"])
    tensorrt.add_argument("--hardware-compatibility", default="none", choices=HARDWARE_COMPATIBILITY,
                          help=trt_help["hardware_compatibility"])
    tensorrt.add_argument("--max-new-tokens", type=int, default=TrtBuildConfig.max_new_tokens, help=trt_help["max_new_tokens"])
    tensorrt.add_argument("--recipes-only", action="store_true", help=trt_help["recipes_only"])
    tensorrt.set_defaults(func=_export_tensorrt)


def _export_sam2(args: argparse.Namespace) -> int:
    from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2
    from conceptseg_edge.fileio import writable_output

    writable_output(args.out, "--out", directory=True)  # before any progress output or model

    manifest = export_sam2(
        SAM2ExportConfig(config=args.config, checkpoint=args.checkpoint, opset=args.opset, image_size=args.image_size,
                         weight_storage=args.weight_storage, video=args.video),
        args.out,
    )
    return _print_parity(args.out, manifest)


def _print_parity(out: str, manifest) -> int:
    """What ``export sam2`` / ``export sam3`` print: the bundle, whether it is random init, each part's parity."""
    parity = {name: part.parity.to_dict() for name, part in manifest.parts.items() if part.parity}
    print(json.dumps({"bundle": out, "random_init": manifest.source.random_init, "parity": parity}, indent=2))
    return 0


def _export_sam3(args: argparse.Namespace) -> int:
    from conceptseg_edge.export.sam3 import export_sam3
    from conceptseg_edge.fileio import writable_output

    writable_output(args.out, "--out", directory=True)  # before sam3 is imported or a model built

    manifest = export_sam3(
        Sam3ExportConfig(variant=args.variant, checkpoint=args.checkpoint, opset=args.opset,
                         weight_storage=args.weight_storage, concept_slots=args.concept_slots),
        args.out,
    )
    return _print_parity(args.out, manifest)


def _export_concept(args: argparse.Namespace) -> int:
    from conceptseg_edge.export.concept import ConceptExportConfig, export_concept
    from conceptseg_edge.fileio import writable_output

    writable_output(args.out, "--out", directory=True)  # before the checkpoint is loaded

    manifest = export_concept(
        ConceptExportConfig(args.checkpoint, args.policy_precision, args.opset, weight_storage=args.weight_storage,
                            stream_policy=args.stream_policy, route_parity=args.route_parity, video=args.video,
                            backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint),
        args.out
    )
    print(json.dumps({
        "bundle": args.out,
        "routes": list(manifest.routes),
        "parts": {name: {"precision": p.precision, "weight_storage": p.weight_storage,
                         "parity": p.parity.to_dict() if p.parity else None,
                         "quantized_parity": p.quantized_parity.to_dict() if p.quantized_parity else None}
                  for name, p in manifest.parts.items()},
        "route_parity": manifest.route_parity,
    }, indent=2))
    return 0


def _export_qdq(args: argparse.Namespace) -> int:
    cfg = QdqConfig(precision=args.precision, calibration=args.calib, held_out=args.held_out,
                    parts=tuple(args.parts) if args.parts else None)
    manifest = export_qdq(args.bundle, args.out, cfg)
    print(json.dumps({
        "bundle": args.out,
        "precision": args.precision,
        "parts": {name: {"precision": p.precision, "qdq": p.qdq.to_dict()} for name, p in manifest.parts.items() if p.qdq},
    }, indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    from conceptseg_edge.export.trt_check import SOURCE, check_bundle

    results = check_bundle(args.bundle)
    print(json.dumps({
        "bundle": args.bundle,
        "source": SOURCE,
        "parts": {name: [v.to_dict() for v in found] if found else "ok" for name, found in results.items()},
    }, indent=2))
    return 1 if any(results.values()) else 0


def _export_tensorrt(args: argparse.Namespace) -> int:
    from conceptseg_edge.export.tensorrt import build_engine_bundle
    from conceptseg_edge.fileio import writable_output

    writable_output(args.out, "--out", directory=True)  # before TensorRT is looked for or a graph is read
    cfg = TrtBuildConfig(precision=args.precision, calib=args.calib, profiles=tuple(args.profile), workspace_gb=args.workspace,
                         timing_cache=args.timing_cache, hardware_compatibility=args.hardware_compatibility,
                         max_new_tokens=args.max_new_tokens, recipes_only=args.recipes_only)
    manifest = build_engine_bundle(args.bundle, args.out, cfg)
    print(json.dumps({
        "bundle": args.out,
        "precision": args.precision,
        "recipes_only": args.recipes_only,
        "recipes": sorted(rel for rel in manifest.files if rel.endswith(".sh")),
        "parts": {name: {"format": p.format, "file": p.file, "precision": p.precision,
                         "qdq": p.qdq.to_dict() if p.qdq else None, "engine": p.engine.to_dict() if p.engine else None}
                  for name, p in manifest.parts.items()},
    }, indent=2))
    return 0
