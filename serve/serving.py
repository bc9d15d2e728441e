"""What runs inside Triton's python backend: the ``conceptseg`` model and the python-served graphs.

The generated ``model.py`` files are a few lines of glue (``pb_utils`` tensors ↔ numpy dicts); the
logic is here so it is importable, typed and testable without a server:

- ``ServedModel``: the runtime (router + routes) behind the request contract of
  ``conceptseg_edge.serve.protocol``. With ``engines="local"`` (the *python* flavor) the encoder
  and decoder are ONNX Runtime sessions in the model's own process; with ``engines="bls"`` (the
  *native* flavor) each graph call is a BLS request to the graph's own Triton model
  (``onnxruntime_onnx`` / ``tensorrt_plan``): ``BlsEngineFactory`` is the runtime's
  ``EngineFactory`` that hands ``ConceptSegmenter.from_bundle`` a ``BlsEngine`` per part, so the
  segmenter, predictor and concept encoder are built and run by the very same code as in process.
  Settings arrive as the typed ``RouterParameters`` of ``conceptseg_edge.serve.parameters``.
- ``GraphModel``: one exported graph served by the python backend with ONNX Runtime, for servers
  that lack the onnxruntime backend (the ``nvidia-pytriton`` wheel); it batches what the dynamic
  batcher hands it when the shapes allow.

Nothing here imports torch; ``pb_utils`` is passed in, never imported, so the module loads anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.errors import ConceptsegError, InputError, ManifestError, RouteUnavailableError
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import PartManifest, TensorSpec, read_manifest
from conceptseg_edge.preprocess import without_reprs
from conceptseg_edge.runtime.engine import EngineFactory, OrtEngine, check_feeds, open_engine
from conceptseg_edge.runtime.segmenter import ConceptSegmenter
from conceptseg_edge.serve.parameters import GraphParameters, RouterParameters
from conceptseg_edge.serve.protocol import ServeLimits, encode_result, parse_request, timings_array
from conceptseg_edge.timings import elapsed_ms

WARMUP_HW = (64, 96)


class GraphCallError(ConceptsegError):
    """A BLS call from the router model to a graph model failed inside the server."""


def classify_error(exc: BaseException) -> tuple[str, str]:
    """Map an exception to a Triton error code name and message: the caller's fault or the server's.

    The message goes to the client: object reprs (addresses of the server's objects) are removed.
    """
    text = without_reprs(str(exc))
    if isinstance(exc, (InputError, RouteUnavailableError)):
        return "INVALID_ARG", text
    if isinstance(exc, ConceptsegError):
        return "INTERNAL", f"{type(exc).__name__}: {text}"
    return "INTERNAL", f"unexpected {type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------- BLS engine


class BlsEngine:
    """The runtime's ``Engine`` protocol over a BLS call to another model in the same server.

    IO names, dtypes and shapes come from the bundle manifest's part (the graph model's config was
    generated from the same ``PartManifest``), so a mismatch is an ``EngineIOError`` here, before
    the request leaves the router.
    """

    def __init__(self, pb_utils: Any, model_name: str, part: PartManifest) -> None:
        self._pb = pb_utils
        self.model_name = model_name
        self.name = part.name
        self.inputs: tuple[TensorSpec, ...] = part.inputs
        self.outputs: tuple[TensorSpec, ...] = part.outputs
        self.provider = f"triton-bls:{model_name}"
        self._output_names = [t.name for t in part.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feeds(self.name, self.inputs, feeds)
        pb = self._pb
        request = pb.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=self._output_names,
            inputs=[pb.Tensor(name, value) for name, value in checked.items()],
        )
        response = request.exec()
        if response.has_error():
            raise GraphCallError(f"BLS call to model {self.model_name!r} failed: {response.error().message()}")
        out = {}
        for name in self._output_names:
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise GraphCallError(f"BLS call to model {self.model_name!r}: no output {name!r} in the response")
            out[name] = tensor.as_numpy()
        return out


@dataclass(frozen=True)
class BlsEngineFactory:
    """The runtime's ``EngineFactory`` inside the native flavor's router: part → ``BlsEngine`` to its graph model.

    ``graph_models`` maps bundle part names to the Triton models serving them (the router's
    ``RouterParameters.graph_models``); ``provider`` is the graph models' business, not the router's.
    """

    pb_utils: Any
    graph_models: Mapping[str, str]

    def __call__(self, bundle_dir: Path, part: PartManifest, provider: str) -> BlsEngine:
        model = self.graph_models.get(part.name)
        if model is None:
            raise ManifestError(f"graph_models: no Triton model serves part {part.name!r} (has {sorted(self.graph_models)})")
        return BlsEngine(self.pb_utils, model, part)


# ---------------------------------------------------------------------------- the conceptseg model


class ServedModel:
    """The router model: one request in, one response (or one typed error) out."""

    def __init__(self, segmenter: ConceptSegmenter, limits: ServeLimits = ServeLimits()) -> None:
        self.segmenter = segmenter
        self.limits = limits

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], version_dir: str | Path, pb_utils: Any = None) -> ServedModel:
        """Build from the ``parameters`` of the generated ``config.pbtxt`` (``RouterParameters``).

        ``engines="local"`` opens the bundle's graphs with ONNX Runtime in this process and warms up
        (unless told not to); ``engines="bls"`` needs ``pb_utils`` and builds every graph as a BLS call.
        """
        parameters = RouterParameters.from_parameters(params)
        bundle = parameters.bundle_dir(version_dir)
        engine_factory: EngineFactory = open_engine
        manifest = None  # local: from_bundle loads the bundle and verifies every file
        if parameters.engines == "bls":
            if pb_utils is None:
                raise InputError("engines=bls needs the python backend's pb_utils")
            engine_factory = BlsEngineFactory(pb_utils, parameters.graph_models)
            manifest = read_manifest(bundle)  # the graph files live in their own models; hashes were checked at build
        segmenter = ConceptSegmenter.from_bundle(
            bundle,
            provider=parameters.provider,
            bank_dir=parameters.bank_dir,
            generation=parameters.generation or GenerationConfig(),
            engine_factory=engine_factory,
            manifest=manifest,
        )
        model = cls(segmenter, parameters.limits)
        if parameters.warmup:
            model.warmup()
        return model

    def warmup(self) -> None:
        """One prompt-route request on a synthetic image, so the first client does not pay for it (a
        bundle without that route, SAM 3's, warms up on its shortcut: the text prompt)."""
        h, w = WARMUP_HW
        image = (np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3) % 251).astype(np.uint8)
        if "prompt" in self.segmenter.routes:
            self.segmenter.segment(image, points=[[w / 2, h / 2]])
        else:
            self.segmenter.segment(image, query="object", route="shortcut")

    def handle(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decode, segment, encode. Raises ``InputError`` for a bad request."""
        t0 = time.perf_counter_ns()
        request = parse_request(tensors, self.limits)
        decode_ms = elapsed_ms(t0)
        result = self.segmenter.segment(request.image, **request.segment_kwargs())
        t1 = time.perf_counter_ns()
        timings = {"decode_request": decode_ms, **result.timings}
        outputs = encode_result(result, timings)
        timings["encode_response"] = elapsed_ms(t1)
        timings["server_total"] = elapsed_ms(t0)
        outputs["TIMINGS"] = timings_array(timings)
        return outputs

    def respond(self, tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, tuple[str, str] | None]:
        """``handle`` that never raises: (outputs, None) or (None, (error code name, message))."""
        try:
            return self.handle(tensors), None
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error, never the server's
            return None, classify_error(exc)


# ---------------------------------------------------------------------------- python-served graphs


class GraphModel:
    """One ONNX graph under the python backend; batches the dynamic batcher's requests when it can."""

    def __init__(self, engine: Any, batched: bool) -> None:
        self.engine = engine
        self.batched = batched

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], version_dir: str | Path, model: str = "graph") -> GraphModel:
        """Build from the ``parameters`` of the generated ``config.pbtxt`` (``GraphParameters``)."""
        parameters = GraphParameters.from_parameters(params, model)
        return cls(OrtEngine(Path(version_dir) / parameters.graph_file, parameters.provider), parameters.batched)

    def run_many(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[dict[str, np.ndarray] | None, tuple[str, str] | None]]:
        """Run each request (one concatenated batch when every input's trailing shape agrees)."""
        if self.batched and len(requests) > 1 and _stackable(requests):
            try:
                names = list(requests[0])
                sizes = [len(r[names[0]]) for r in requests]
                out = self.engine.run({n: np.concatenate([r[n] for r in requests]) for n in names})
                bounds = np.cumsum([0, *sizes])
                return [({k: v[bounds[i]:bounds[i + 1]] for k, v in out.items()}, None) for i in range(len(requests))]
            except Exception:  # noqa: BLE001 - fall back to one call per request, each with its own error
                pass
        results = []
        for feeds in requests:
            try:
                results.append((self.engine.run(feeds), None))
            except Exception as exc:  # noqa: BLE001
                results.append((None, classify_error(exc)))
        return results


def _stackable(requests: Sequence[Mapping[str, np.ndarray]]) -> bool:
    first = requests[0]
    return all(
        set(r) == set(first) and all(r[n].shape[1:] == first[n].shape[1:] and r[n].dtype == first[n].dtype for n in first)
        for r in requests[1:]
    )
