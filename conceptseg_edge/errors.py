"""The error hierarchy: one root, few typed children.

Every error a user can cause (a bad file, a bad prompt, a tampered bundle) is a ``ConceptsegError``;
the CLI turns it into one line on stderr and a non-zero exit, never a traceback. Messages lead with
the path or field at fault and say what was expected.
"""

from __future__ import annotations


class ConceptsegError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = 2


class InputError(ConceptsegError, ValueError):
    """A request was malformed: an unreadable image, a point outside the image, no prompt at all."""


class ManifestError(ConceptsegError):
    """A bundle manifest is missing, of another schema version, malformed, or its files fail their hashes."""


class EngineIOError(ConceptsegError):
    """Feeds given to an engine do not match its declared inputs (names, dtypes, ranks)."""


class ExportParityError(ConceptsegError):
    """An exported graph disagrees with the reference module beyond its tolerance."""


class CheckpointError(ConceptsegError):
    """A checkpoint cannot be loaded: missing file, wrong keys, wrong format."""


class TrainingError(ConceptsegError):
    """A training run cannot go on: a non-finite loss, or weights that would be written with inf/NaN."""


class RouteUnavailableError(ConceptsegError):
    """The requested route needs parts that the bundle does not carry."""


class DependencyError(ConceptsegError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class BenchmarkError(ConceptsegError):
    """A benchmark stage failed; ``stage`` names where."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"[{stage}] {message}")
        self.stage = stage


class ProviderError(InputError):
    """The requested execution provider cannot run here: absent from this onnxruntime build, or dropped
    by ONNX Runtime when it created the session (missing CUDA/TensorRT libraries). Never a silent
    fallback: the message names the provider, what this build has, and how to fix it."""


class ExportError(ConceptsegError):
    """An exported graph cannot serve its declared target: e.g. TensorRT's ONNX parser documents an op,
    attribute or input of it as unsupported (``export/trt_check.py``). The message names every node."""


class EngineUnavailableError(DependencyError):
    """A TensorRT engine cannot run in this install: ``tensorrt`` or the CUDA Python bindings do not
    import. The message names the missing module and the package that brings it (the ``gpu`` extra,
    or JetPack's own TensorRT on a Jetson)."""


class EngineCompatibilityError(ManifestError):
    """A TensorRT engine was built for another TensorRT release or GPU than this machine's: named with
    the recorded and the found values, and the command that rebuilds the engine here."""


class EngineRunError(EngineIOError):
    """TensorRT or CUDA refused a call while loading or running an engine; the message names the call."""


class VideoError(InputError):
    """A video source cannot be read: missing, unreadable or corrupt, no frames at all, or frames that
    change size mid-stream. The message names the source (and the frame, when one is at fault)."""
