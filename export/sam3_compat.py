"""Export-time workarounds that let Meta's ``sam3`` package (PyPI ``sam3==0.1.4``) build and run on a
CPU-only torch, in one place, each with its reason.

Everything happens inside ``sam3_compat()``, a context manager the SAM 3 export path and its tests
enter before they import ``sam3``; nothing here is imported by the runtime, and every class attribute
it replaces is put back on exit. What it does:

1. **A private site directory.** ``sam3`` imports ``torchvision`` (decoder, geometry encoder) and
   ``timm`` (ViT layers), and ``timm`` imports ``torchvision`` at import time. The only torchvision
   release for torch 2.13 on PyPI is CUDA-linked: installed in the main environment it fails to import
   (``torchvision::nms does not exist``) and breaks every ``transformers`` import that probes it. So the
   ``sam3`` extra lives in a directory of its own (``SAM3_SITE``; ``pip install --target``) that is on
   ``sys.path`` only inside the context, and the modules loaded from it leave ``sys.modules`` when the
   context ends (they are put back, the same objects, when the next one opens): the rest of the
   process never finds torchvision.
2. **torchvision's op schemas.** torchvision registers Python kernels (meta/fake) for ``nms``/``qnms``
   at import, which fails when its C++ extension (CUDA-linked) does not load. Defining the two schemas
   with ``torch.library`` first lets it import; SAM 3 needs neither op.
3. **roi_align in eager torch.** Without the C++ extension torchvision falls back to a pure-torch
   ``_roi_align`` wrapped in a lazy ``torch.compile`` (a C++ toolchain and minutes of compile on first
   call). The context swaps in the same function uncompiled (its ``__wrapped__``).
4. **No triton.** ``sam3/__init__`` imports the tracker, whose ``sam3.model.edt`` imports ``triton`` at
   top level for a GPU distance transform the image model never calls. A stand-in ``sam3.model.edt``
   whose ``edt_triton`` raises is registered instead of a fake ``triton``: torch itself probes for
   ``triton``, and a fake one breaks ``torch._dynamo``.
5. **Hard-coded ``cuda`` devices at construction.** ``PositionEmbeddingSine(precompute_resolution=...)``
   allocates on ``"cuda"`` to fill its cache, and ``TransformerDecoder.__init__`` calls
   ``_get_coords(..., device="cuda")``; both are redirected to the CPU.
6. **``pin_memory`` without an accelerator.** ``SequenceGeometryEncoder._encode_boxes`` pins a 4-element
   scale tensor unconditionally (also for the empty box prompt of every text query); pinning needs an
   accelerator, so inside the context it returns the tensor unchanged (it is then moved to the CPU).
7. **Uninitialised text parameters.** ``TextTransformer`` allocates ``positional_embedding`` and
   ``text_projection`` with ``torch.empty`` and leaves them to the checkpoint; a random build can hold
   NaN/inf there. They get open_clip's initialisation (normal, std 0.01 and width^-0.5); a checkpoint
   overwrites both.
8. **Real-valued RoPE.** The ViT applies 2-D RoPE through ``view_as_complex`` on a complex
   ``freqs_cis`` buffer; ONNX has no complex type, so the TorchScript exporter cannot trace it. Each
   attention block also gets ``rope_cos``/``rope_sin`` (the buffer's real and imaginary parts,
   non-persistent, re-read after every ``load_state_dict``) and rotates with real arithmetic: the
   same product, (a + ib)(c + is).
9. **The decoder's feature size as Python ints.** ``TransformerDecoder._get_rpb_matrix`` receives the
   feature size as a tensor row of ``spatial_shapes``; it is only compared with the cached size and
   used for shapes, so it is converted to ints (a data-dependent value would end up in the graph).
10. **The empty box prompt short-cut.** Every text query carries the empty box prompt, and
   ``_encode_boxes`` still pools, projects and adds it: zero-row roi_align kills the TorchScript exporter
   (SIGFPE) and the zero-row broadcasts fail ONNX shape inference. With no boxes the package's result
   is the empty (0, B, 256) sequence and the mask it was given; that is returned directly.
11. **Padded-sequence concatenation without a slice assignment.** ``geometry_encoders.
   concat_padded_sequences`` writes the first sequence into a zero buffer with
   ``buf[:len1] = seq1``; with the empty box prompt ``len1`` is 0 and the TorchScript exporter dies
   (SIGFPE in ``index_put``'s symbolic). The same buffer is built with ``torch.cat``; the rest (the
   scatter of the second sequence after the first's valid length) is the package's code. Its
   ``torch._assert_async`` right-padding checks are left out: the export's masks are right-padded by
   construction.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from conceptseg_edge.errors import DependencyError

#: Where ``make install`` puts the ``sam3`` extra (sam3, timm, torchvision, open_clip, ...), apart from
#: the environment's site-packages; ``CONCEPTSEG_SAM3_SITE`` overrides it.
SAM3_SITE = Path(os.environ.get("CONCEPTSEG_SAM3_SITE", Path(sys.prefix) / "sam3-site"))

#: The CLIP BPE merges SAM 3's tokenizer reads; not in the sam3 wheel, shipped by open_clip's.
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

#: What goes into ``SAM3_SITE`` (sam3 and everything it imports that the main environment lacks), pinned
#: to the versions the tests ran with; ``--no-deps`` because sam3's metadata would pull a CUDA torch.
SAM3_PACKAGES = ("sam3==0.1.4", "timm==1.0.31", "torchvision==0.28.0", "open_clip_torch==3.3.0", "ftfy==6.3.1",
                 "wcwidth==0.9.4", "einops==0.8.2", "pycocotools==2.0.11")


def install_command() -> str:
    """The pip line that installs ``SAM3_PACKAGES`` into ``SAM3_SITE`` (``make install`` runs the same)."""
    return f"pip install --no-deps --upgrade --target {SAM3_SITE} {' '.join(SAM3_PACKAGES)}"


_torchvision_library = None  # the op schemas of step 2 (defined once per process; they cannot be undefined)


_stashed: dict[str, types.ModuleType] = {}  # SAM3_SITE's modules while no context is open


def _site_on_path(stack: ExitStack) -> None:
    if SAM3_SITE.is_dir() and str(SAM3_SITE) not in sys.path:
        sys.path.insert(0, str(SAM3_SITE))
        stack.callback(sys.path.remove, str(SAM3_SITE))
    sys.modules.update(_stashed)  # the same module objects as last time, so models built then still match
    _stashed.clear()
    stack.callback(_stash_site_modules)
    if importlib.util.find_spec("sam3") is None:
        raise DependencyError(f"sam3 is not installed (looked in {SAM3_SITE} and sys.path): {install_command()}")


def _stash_site_modules() -> None:
    """Take every module loaded from ``SAM3_SITE`` out of ``sys.modules`` until the next context.

    Left there, ``importlib.util.find_spec("torchvision")`` would keep finding it, and ``transformers``
    (which asks exactly that) would switch its image processors to torchvision code paths in the rest
    of the process.
    """
    site = str(SAM3_SITE)
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), None)
        if origin is not None and str(origin).startswith(site):
            _stashed[name] = sys.modules.pop(name)


def _define_torchvision_schemas() -> None:
    global _torchvision_library
    import torch

    if _torchvision_library is not None or "torchvision" in sys.modules or "torchvision" in _stashed:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor"):
        if not _has_op(schema.split("(")[0]):
            lib.define(schema)
    _torchvision_library = lib


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_edt_standin(stack: ExitStack) -> None:
    if "sam3.model.edt" in sys.modules:
        return
    module = types.ModuleType("sam3.model.edt")
    module.__doc__ = "Stand-in for sam3's triton EDT kernel (export/sam3_compat.py step 4)."

    def edt_triton(data):  # noqa: ARG001 - the signature of the module it replaces
        raise NotImplementedError("sam3.model.edt needs triton (GPU); the SAM 3 image export never calls it")

    module.edt_triton = edt_triton
    sys.modules["sam3.model.edt"] = module
    stack.callback(sys.modules.pop, "sam3.model.edt", None)


def _patch(stack: ExitStack, owner: object, name: str, value: object) -> None:
    """Set ``owner.name`` until the context ends; an attribute ``owner`` only inherited is deleted again."""
    if isinstance(owner, type) and name not in owner.__dict__:
        setattr(owner, name, value)
        stack.callback(delattr, owner, name)
        return
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, original)


def _rotate(x, cos, sin):
    """(a + ib)(c + is) on the interleaved pairs of ``x``'s last axis, as ``apply_rotary_enc`` does."""
    import torch

    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


def _patch_sam3(stack: ExitStack) -> None:
    import torch
    from sam3.model import decoder, geometry_encoders, position_encoding, text_encoder_ve, vitdet

    tv_roi_align = importlib.import_module("torchvision.ops.roi_align")  # the module; torchvision.ops.roi_align is the function

    # 3: the uncompiled pure-torch roi_align.
    compiled = tv_roi_align._roi_align
    _patch(stack, tv_roi_align, "_roi_align", getattr(compiled, "__wrapped__", compiled))

    # 10: the empty box prompt encodes to the empty sequence directly.
    encode_boxes = geometry_encoders.SequenceGeometryEncoder._encode_boxes

    def encode_boxes_or_empty(self, boxes, boxes_mask, boxes_labels, img_feats):
        if boxes.shape[0] == 0:
            return boxes.new_zeros((0, boxes.shape[1], self.d_model)), boxes_mask
        return encode_boxes(self, boxes, boxes_mask, boxes_labels, img_feats)

    _patch(stack, geometry_encoders.SequenceGeometryEncoder, "_encode_boxes", encode_boxes_or_empty)

    # 11: concat_padded_sequences without a slice assignment.
    def concat_padded_sequences(seq1, mask1, seq2, mask2, return_index: bool = False):
        seq1_length, batch_size, hidden_size = seq1.shape
        seq2_length = seq2.shape[0]
        actual_seq1_lengths = (~mask1).sum(dim=-1)
        final_lengths = actual_seq1_lengths + (~mask2).sum(dim=-1)
        concatenated_mask = torch.arange(seq1_length + seq2_length)[None].repeat(batch_size, 1) >= final_lengths[:, None]
        concatenated_sequence = torch.cat([seq1.to(seq2.dtype), seq2.new_zeros((seq2_length, batch_size, hidden_size))])
        index = torch.arange(seq2_length)[:, None].repeat(1, batch_size) + actual_seq1_lengths[None]
        concatenated_sequence = concatenated_sequence.scatter(0, index[:, :, None].expand(-1, -1, hidden_size), seq2)
        if return_index:
            return concatenated_sequence, concatenated_mask, index
        return concatenated_sequence, concatenated_mask

    _patch(stack, geometry_encoders, "concat_padded_sequences", concat_padded_sequences)

    # 5: construction-time cuda allocations.
    cls = position_encoding.PositionEmbeddingSine
    init = cls.__init__

    def position_init(self, *args, precompute_resolution=None, **kwargs):
        init(self, *args, precompute_resolution=None, **kwargs)
        if precompute_resolution is not None:
            for stride in (4, 8, 16, 32):
                size = (precompute_resolution // stride, precompute_resolution // stride)
                self.forward(torch.zeros((1, 1) + size))
                self.cache[size] = self.cache[size].clone().detach()

    _patch(stack, cls, "__init__", position_init)
    get_coords = decoder.TransformerDecoder._get_coords

    def cpu_coords(H, W, device):
        return get_coords(H, W, "cpu" if str(device).startswith("cuda") and not torch.cuda.is_available() else device)

    _patch(stack, decoder.TransformerDecoder, "_get_coords", staticmethod(cpu_coords))

    # 9: the feature size as ints.
    rpb = decoder.TransformerDecoder._get_rpb_matrix

    def rpb_int_size(self, reference_boxes, feat_size):
        return rpb(self, reference_boxes, tuple(int(v) for v in feat_size))

    _patch(stack, decoder.TransformerDecoder, "_get_rpb_matrix", rpb_int_size)

    # 6: pin_memory without an accelerator (only while inside the context).
    if not torch.cuda.is_available():
        _patch(stack, torch.Tensor, "pin_memory", lambda self, *a, **k: self)

    # 7: open_clip's initialisation for the two empty text parameters.
    text_cls = text_encoder_ve.TextTransformer
    text_init = text_cls.__init__

    def text_transformer_init(self, *args, **kwargs):
        text_init(self, *args, **kwargs)
        with torch.no_grad():
            torch.nn.init.normal_(self.positional_embedding, std=0.01)
            if getattr(self, "text_projection", None) is not None:
                torch.nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    _patch(stack, text_cls, "__init__", text_transformer_init)

    # 8: real-valued RoPE.
    attn = vitdet.Attention
    setup = attn._setup_rope_freqs

    def real_tables(module, _incompatible=None):
        module.register_buffer("rope_cos", module.freqs_cis.real.contiguous(), persistent=False)
        module.register_buffer("rope_sin", module.freqs_cis.imag.contiguous(), persistent=False)

    def setup_rope(self):
        setup(self)
        if self.freqs_cis is not None:
            real_tables(self)
            self.register_load_state_dict_post_hook(real_tables)  # a checkpoint's freqs_cis wins

    def apply_rope(self, q, k):
        if not self.use_rope:
            return q, k
        return _rotate(q, self.rope_cos, self.rope_sin), (_rotate(k, self.rope_cos, self.rope_sin) if k.shape[-2] else k)

    _patch(stack, attn, "_setup_rope_freqs", setup_rope)
    _patch(stack, attn, "_apply_rope", apply_rope)


@contextmanager
def sam3_compat() -> Iterator[None]:
    """Make ``sam3`` importable and runnable on this CPU-only torch until the block ends.

    Raises:
        DependencyError: ``sam3`` is neither in ``SAM3_SITE`` nor importable otherwise.
    """
    with ExitStack() as stack:
        _site_on_path(stack)
        _define_torchvision_schemas()
        _register_edt_standin(stack)
        _patch_sam3(stack)
        yield


def bpe_path() -> Path:
    """The CLIP BPE merges file (open_clip's copy), found without importing open_clip (it imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"open_clip is not installed ({BPE_FILE} comes from its wheel): {install_command()}")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise DependencyError(f"{path}: missing from the installed open-clip-torch")
    return path




def install() -> int:
    """Install ``SAM3_PACKAGES`` into ``SAM3_SITE`` with this interpreter's pip (``make install`` runs it)."""
    import subprocess

    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(SAM3_SITE), *SAM3_PACKAGES]
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(install())
