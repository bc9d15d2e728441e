"""Policy benchmarks: precisions side by side, and hidden-state capture vs. a second forward pass.

- **Precisions**: the same prompt decoded greedily by each bundle's policy (bundles exported from one
  checkpoint at fp32 / int8 / int4). Reported: prefill ms, decode tokens/s (decoding steps after the
  first token, which the prefill yields), and teacher-forced greedy agreement with the first bundle:
  the reference completion is fed to the other policy and its argmax at each completion position is
  compared, so one early divergence does not count against every later token.
- **Capture**: our decoding keeps each step's last hidden state as it goes; the official code
  generates, then runs a full forward over prompt + completion to get them. Both are timed on the
  same engines (and, with a checkpoint, in torch: forward hook vs. ``generate`` + forward).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.manifest import load_bundle


def _prompt(seed: int = 11):
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.episodes import build_meta_episode

    ep = ConceptWorld(seed=seed, image_size=256).episode(0, with_supports=False)
    meta = build_meta_episode(ep.image, None, ep.query, ())
    return meta.images(), meta.prompt


def _ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


def bench_policy(bundle: str | Path, compare: Sequence[str | Path] = (), runs: int = 3, max_new_tokens: int = 32) -> dict[str, Any]:
    """Decode rate and agreement per precision, and the capture-vs-refeed ratio."""
    from conceptseg_edge.runtime.policy import OnnxPolicy

    images, text = _prompt()
    rows: list[dict[str, Any]] = []
    reference_tokens: np.ndarray | None = None
    capture: dict[str, Any] = {}
    for path in (bundle, *compare):
        manifest = load_bundle(path)
        policy = OnnxPolicy.from_bundle(path, manifest)
        gens, decode_rates, prefill_ms, gen_ms, refeed_ms = [], [], [], [], []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            gen = policy.generate(images, text, max_new_tokens)
            gen_ms.append(_ms(t0))
            gens.append(gen)
            prefill_ms.append(policy.timings["policy_prefill"])
            if "policy_decode_tokens_per_s" in policy.timings:
                decode_rates.append(policy.timings["policy_decode_tokens_per_s"])
            t1 = time.perf_counter_ns()
            policy.prefill(images, text, append_ids=gen.token_ids[:-1])  # the official second forward
            refeed_ms.append(_ms(t1))
        tokens = gens[0].token_ids
        row: dict[str, Any] = {
            "bundle": str(path),
            "precision": manifest.part("policy_decoder").precision,
            "prefill_ms_p50": round(statistics.median(prefill_ms), 2),
            "decode_tokens_per_s": round(statistics.median(decode_rates), 2) if decode_rates else None,
            "new_tokens": int(len(tokens)),
        }
        if reference_tokens is None:
            reference_tokens = tokens
            g, r = statistics.median(gen_ms), statistics.median(refeed_ms)
            capture["runtime"] = {"generate_with_capture_ms": round(g, 2), "generate_then_forward_ms": round(g + r, 2),
                                  "ratio": round(g / (g + r), 3)}
        else:
            state = policy.prefill(images, text, append_ids=reference_tokens[:-1])
            predicted = state.predicted_ids[-len(reference_tokens):]
            row["greedy_agreement_vs_first"] = round(float(np.mean(predicted == reference_tokens)), 4)
        rows.append(row)
    base = rows[0]["decode_tokens_per_s"]
    for row in rows:
        if base and row["decode_tokens_per_s"]:
            row["decode_speedup_vs_first"] = round(row["decode_tokens_per_s"] / base, 3)
    return {"precisions": rows, "capture": capture, "max_new_tokens": max_new_tokens, "runs": runs}


def bench_torch_capture(checkpoint: str | Path, runs: int = 3, max_new_tokens: int = 32) -> dict[str, float]:
    """Torch: forward-hook capture during ``generate`` vs. ``generate`` then a teacher-forced forward."""
    import torch

    from conceptseg_edge.models.checkpoint import load_checkpoint
    from conceptseg_edge.models.policy import PolicyWrapper

    ckpt = load_checkpoint(checkpoint)
    policy = PolicyWrapper(ckpt.policy, ckpt.processor)
    images, text = _prompt()
    inputs = policy.build_inputs(images, text)
    capture, baseline = [], []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        out = policy.generate_from_inputs(inputs, max_new_tokens)
        capture.append(_ms(t0))
        t1 = time.perf_counter_ns()
        with torch.no_grad():
            seq = ckpt.policy.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=policy._eos_ids, pad_token_id=policy._pad_id)
            policy.teacher_forced_hidden_states(inputs, seq[0, inputs["input_ids"].shape[1]:])
        baseline.append(_ms(t1))
    c, b = statistics.median(capture), statistics.median(baseline)
    return {"generate_with_capture_ms": round(c, 2), "generate_then_forward_ms": round(b, 2), "ratio": round(c / b, 3),
            "new_tokens": int(len(out.token_ids))}
