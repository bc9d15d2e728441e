"""Typed parameters of the generated python-backend models: what ``config.pbtxt`` carries, read back strictly.

Triton hands a python-backend model its ``parameters`` as a string → string map (the protobuf has no
other kind). Each model kind ``triton build`` writes has one frozen dataclass here, so the builder and
the model that reads the map share one definition of every key:

- ``RouterParameters``: the ``conceptseg`` model. ``engines="local"`` (python flavor: ONNX Runtime in
  the model's own process) or ``engines="bls"`` (native flavor: every graph a BLS call to the graph
  model named in ``graph_models``);
- ``GraphParameters``: one bundle graph under the python backend (``--graph-backend python``);
- ``StreamParameters``: the ``conceptseg_stream`` model (video tracking per sequence id).

``to_parameters()`` renders the map; ``from_parameters(params)`` parses it back and refuses, with a
``ModelConfigError`` naming the key, an unknown key, a missing required key or a value of the wrong
form. The string forms are the ones repositories have always carried: flags ``"1"``/``"0"``,
integers in decimal, ``graph_models`` a JSON object of part → model name; keys whose value is unset
(``bank_dir``, ``max_new_tokens``) are left out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, get_args

from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.runtime.engine import PROVIDER_NAMES, Provider
from conceptseg_edge.serve.model_config import ModelConfigError
from conceptseg_edge.serve.protocol import MODEL_NAME, ServeLimits

EngineMode = Literal["local", "bls"]
ENGINE_MODES: tuple[EngineMode, ...] = get_args(EngineMode)

_FLAGS = {"1": True, "0": False}
_Config = TypeVar("_Config", ServeLimits, GenerationConfig)


class _Reader:
    """One model's parameter map, read key by key; ``finish()`` refuses whatever was never read."""

    def __init__(self, params: Mapping[str, str], model: str) -> None:
        self.model = model
        for key, value in params.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise self.error(str(key), f"{value!r}: keys and values must be strings")
        self._params = dict(params)
        self._read: set[str] = set()

    def error(self, key: str, message: str) -> ModelConfigError:
        return ModelConfigError(f"model {self.model!r}: parameters[{key}]: {message}")

    def has(self, key: str) -> bool:
        return key in self._params

    def text(self, key: str, required: bool = False) -> str | None:
        self._read.add(key)
        if key not in self._params:
            if required:
                raise self.error(key, "missing")
            return None
        value = self._params[key]
        if not value:
            raise self.error(key, "empty; leave the key out instead")
        return value

    def choice(self, key: str, choices: Collection[str]) -> str:
        value = self.text(key, required=True)
        if value not in choices:
            raise self.error(key, f"{value!r}, expected one of {', '.join(choices)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.text(key)
        if value is None:
            return default
        if value not in _FLAGS:
            raise self.error(key, f"{value!r}, expected 1 or 0")
        return _FLAGS[value]

    def positive_int(self, key: str) -> int:
        value = self.text(key, required=True)
        if not value.isascii() or not value.isdigit() or int(value) < 1:
            raise self.error(key, f"{value!r}, expected an int >= 1")
        return int(value)

    def names(self, key: str) -> dict[str, str]:
        value = self.text(key, required=True)
        try:
            names = json.loads(value)
        except json.JSONDecodeError as exc:
            raise self.error(key, f"not JSON ({exc})") from exc
        if not isinstance(names, dict) or not names or not all(isinstance(v, str) and v for v in names.values()):
            raise self.error(key, f"{value!r}, expected a JSON object of part name → model name")
        return names

    def ints(self, cls: type[_Config]) -> _Config:
        """A dataclass of int fields (``ServeLimits``, ``GenerationConfig``) from the keys it names; absent keys keep defaults."""
        return cls(**{f.name: self.positive_int(f.name) for f in dataclasses.fields(cls) if self.has(f.name)})

    def finish(self) -> None:
        unknown = sorted(set(self._params) - self._read)
        if unknown:
            raise ModelConfigError(f"model {self.model!r}: parameters: unknown key(s) {unknown}")


def _ints(config: ServeLimits | GenerationConfig) -> dict[str, str]:
    return {f.name: str(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _flag(value: bool) -> str:
    return "1" if value else "0"


@dataclass(frozen=True)
class RouterParameters:
    """The ``conceptseg`` model's settings.

    Attributes:
        engines: ``local`` (python flavor) or ``bls`` (native flavor).
        bundle: the bundle directory, relative to the model's version directory (a copied bundle)
            or absolute (a referenced one).
        provider: the ONNX Runtime provider of the in-process engines (``engines="local"``).
        warmup: run one request at load; only ``local`` can (BLS calls are allowed only in ``execute``).
        bank_dir: concept bank directory of the shortcut route; None: no bank.
        generation: the reason route's budget; None: the runtime's default.
        limits: what one request may ask.
        graph_models: ``bls`` only: bundle part name → the Triton model serving that graph.
    """

    engines: EngineMode = "local"
    bundle: str = "bundle"
    provider: Provider = "cpu"
    warmup: bool = True
    bank_dir: str | None = None
    generation: GenerationConfig | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    graph_models: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engines not in ENGINE_MODES:
            raise ModelConfigError(f"engines: {self.engines!r}, expected one of {', '.join(ENGINE_MODES)}")
        if self.provider not in PROVIDER_NAMES:
            raise ModelConfigError(f"provider: {self.provider!r}, expected one of {', '.join(PROVIDER_NAMES)}")
        if self.engines == "bls" and self.warmup:
            raise ModelConfigError("warmup: a BLS router cannot warm up at load (BLS calls are allowed only in execute())")
        if (self.engines == "bls") != bool(self.graph_models):
            raise ModelConfigError("graph_models: needed by engines=bls, and only there")
        object.__setattr__(self, "graph_models", dict(self.graph_models))

    def bundle_dir(self, version_dir: str | Path) -> Path:
        """The bundle this model serves, resolved against its version directory."""
        return Path(version_dir) / self.bundle  # an absolute ``bundle`` replaces the version directory

    def to_parameters(self) -> dict[str, str]:
        params = {"engines": self.engines, "bundle": self.bundle, "provider": self.provider,
                  "warmup": _flag(self.warmup), **_ints(self.limits)}
        if self.bank_dir is not None:
            params["bank_dir"] = self.bank_dir
        if self.generation is not None:
            params |= _ints(self.generation)
        if self.graph_models:
            params["graph_models"] = json.dumps(dict(self.graph_models), sort_keys=True)
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> RouterParameters:
        reader = _Reader(params, MODEL_NAME)
        engines = reader.choice("engines", ENGINE_MODES)
        generation_keys = {f.name for f in dataclasses.fields(GenerationConfig)}
        parsed = cls(
            engines=engines,
            bundle=reader.text("bundle", required=True),
            provider=reader.choice("provider", PROVIDER_NAMES),
            warmup=reader.flag("warmup", default=engines == "local"),
            bank_dir=reader.text("bank_dir"),
            generation=reader.ints(GenerationConfig) if any(map(reader.has, generation_keys)) else None,
            limits=reader.ints(ServeLimits),
            graph_models=reader.names("graph_models") if engines == "bls" else {},
        )
        reader.finish()
        return parsed


@dataclass(frozen=True)
class GraphParameters:
    """One bundle graph under the python backend: its file in the version directory, provider, batching.

    ``batched``: the model config batches (dynamic batcher on), so the model concatenates the requests
    it is handed into one run when their shapes allow.
    """

    graph_file: str
    provider: Provider = "cpu"
    batched: bool = False

    def __post_init__(self) -> None:
        if not self.graph_file or Path(self.graph_file).name != self.graph_file:
            raise ModelConfigError(f"graph_file: {self.graph_file!r}, expected a file name in the version directory")
        if self.provider not in PROVIDER_NAMES:
            raise ModelConfigError(f"provider: {self.provider!r}, expected one of {', '.join(PROVIDER_NAMES)}")

    def to_parameters(self) -> dict[str, str]:
        return {"graph_file": self.graph_file, "provider": self.provider, "batched": _flag(self.batched)}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], model: str = "graph") -> GraphParameters:
        reader = _Reader(params, model)
        parsed = cls(reader.text("graph_file", required=True), reader.choice("provider", PROVIDER_NAMES),
                     reader.flag("batched", default=False))
        reader.finish()
        return parsed


@dataclass(frozen=True)
class StreamParameters:
    """The ``conceptseg_stream`` model's settings (video tracking under Triton's sequence batcher).

    Attributes:
        bundle: the bundle directory (with the video parts), relative to the version directory or absolute.
        provider: the ONNX Runtime provider of the in-process engines.
        max_streams: most live streams per model instance; a START beyond it is refused.
        idle_timeout_us: a stream idle this long is freed; the same value as the config's
            ``sequence_batching.max_sequence_idle_microseconds``, after which Triton releases the sequence.
        bank_dir: concept bank directory of the shortcut route (concept prompts); None: no bank.
        limits: what one request may ask (frame pixels, points per object, concept length).
    """

    bundle: str = "bundle"
    provider: Provider = "cpu"
    max_streams: int = 16
    idle_timeout_us: int = 30_000_000
    bank_dir: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDER_NAMES:
            raise ModelConfigError(f"provider: {self.provider!r}, expected one of {', '.join(PROVIDER_NAMES)}")
        for key in ("max_streams", "idle_timeout_us"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{key}: {value!r}, expected an int >= 1")

    def bundle_dir(self, version_dir: str | Path) -> Path:
        """The bundle this model serves, resolved against its version directory."""
        return Path(version_dir) / self.bundle

    def to_parameters(self) -> dict[str, str]:
        params = {"bundle": self.bundle, "provider": self.provider, "max_streams": str(self.max_streams),
                  "idle_timeout_us": str(self.idle_timeout_us), **_ints(self.limits)}
        if self.bank_dir is not None:
            params["bank_dir"] = self.bank_dir
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], model: str = "conceptseg_stream") -> StreamParameters:
        reader = _Reader(params, model)
        parsed = cls(bundle=reader.text("bundle", required=True), provider=reader.choice("provider", PROVIDER_NAMES),
                     max_streams=reader.positive_int("max_streams"), idle_timeout_us=reader.positive_int("idle_timeout_us"),
                     bank_dir=reader.text("bank_dir"), limits=reader.ints(ServeLimits))
        reader.finish()
        return parsed
