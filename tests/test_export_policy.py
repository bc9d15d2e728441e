"""Policy → three ONNX graphs, and the torch-free ``OnnxPolicy`` against ``PolicyWrapper``.

The model: the tiny Qwen2.5-VL (text hidden 128, 2 layers; vision depth 2), trained for 60 AdamW
steps on the tiny corpus's chat-formatted completions (loss 6.3 → ~0.8, about 4 s). A random model
has near-uniform logits, where any perturbation flips the greedy token and agreement says nothing;
after training the structural tokens (tags, words) are decided by logit leads of several units,
while the corpus's random box digits stay near-ties — which is why the quantized checks also count
agreement over *decisive* slots only (export.policy.DECISIVE_MARGIN).

Tolerances:
* graphs at fp32: the part atol in export/policy.py (1e-3 features/KV, 1e-2 logits, 0 embeddings);
  measured ~2e-7 (vision), 0 (embed), <=2.2e-6 (decoder).
* ``OnnxPolicy.generate`` vs ``PolicyWrapper.generate`` at fp32: identical token ids and text;
  hidden states atol 1e-4 on post-norm values of order 1 (measured <=1.7e-6; the two sides run
  different kernels for the same float32 math, so bit equality is not expected).
* quantized decoders: the export gates only on broken graphs (export.policy.QUANT_FLOORS); here,
  on the trained model, ``TEST_FLOORS`` pin what was measured (192 teacher-forced slots, 101 of them
  decisive): INT8 agreement 0.984, decisive 1.0, mean cosine 0.9994; INT4 0.974, 1.0, 0.9975. The
  floors leave room for platform rounding (a flip at a near-tie slot costs 0.005) while a
  regression to "sound but lossier" quantization (e.g. per-channel INT8: 0.943) or worse fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptseg_edge.errors import ExportParityError, InputError
from conceptseg_edge.export.onnx_export import export_and_validate, graph_op_types
from conceptseg_edge.export.parts import WEIGHT_STORAGES
from conceptseg_edge.export.policy import (
    REFERENCE_NAME,
    VisionEncoderGraph,
    export_policy,
    policy_decoder_spec,
    policy_embed_spec,
    policy_vision_spec,
    quantized_decoder_parity,
    vision_cases,
    vision_reference,
)
from conceptseg_edge.manifest import PROCESSOR_DIR, BundleManifest, Preprocessing, SourceInfo, write_manifest
from conceptseg_edge.models.policy import PolicyWrapper, build_policy, build_processor, tiny_policy_config
from conceptseg_edge.models.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    tiny_corpus,
    train_tiny_tokenizer,
)
from conceptseg_edge.runtime import policy as rt
from conceptseg_edge.runtime import policy_tokenizer as rt_tok
from conceptseg_edge.runtime.engine import OrtEngine
from conceptseg_edge.runtime.policy import OnnxPolicy, mrope_position_ids, preprocess_policy_image

# Parts whose export this module tests; test_every_registered_part_is_tested checks the registry.
TESTED_PARTS = {"policy_vision", "policy_embed", "policy_decoder"}

TEST_MAX_PIXELS = 112 * 112  # 8x8 patches -> 16 image tokens
DEPLOY_MAX_PIXELS = 600 * 600
HIDDEN_ATOL = 1e-4
TEST_FLOORS = {
    "int8": {"greedy_token_agreement": 0.95, "decisive_token_agreement": 0.99, "hidden_cosine": 0.998},
    "int4": {"greedy_token_agreement": 0.93, "decisive_token_agreement": 0.98, "hidden_cosine": 0.99},
}
TRAIN_STEPS = 60


def _train_peaked(model, processor, steps: int = TRAIN_STEPS) -> None:
    """A few AdamW steps of next-token loss on chat-formatted policy completions (deterministic)."""
    tok = processor.tokenizer
    texts = []
    for line in tiny_corpus(200, seed=3):
        if line.startswith("<think>"):
            query = re.search(r"<answer>(.*)</answer>", line).group(1)
            messages = [{"role": "user", "content": [{"type": "text", "text": query}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            texts.append(prompt + line + EOS_TOKEN)
    encoded = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    # One thread: as fast as two on these tiny matrices, and immune to the 10x+ slowdowns that
    # intra-op spinning suffers when the shared cores are busy.
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            pick = [encoded[i] for i in torch.randint(0, len(encoded), (8,), generator=gen)]
            ids = torch.nn.utils.rnn.pad_sequence(pick, batch_first=True, padding_value=tok.pad_token_id)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(p) for p in pick], batch_first=True)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def processor():
    return build_processor(train_tiny_tokenizer(), max_pixels=TEST_MAX_PIXELS)


@pytest.fixture(scope="module")
def deploy_processor(processor):
    return build_processor(processor.tokenizer, max_pixels=DEPLOY_MAX_PIXELS)


@pytest.fixture(scope="module")
def model(processor):
    m = build_policy(tiny_policy_config(processor.tokenizer), seed=0)
    _train_peaked(m, processor)
    return m


@pytest.fixture(scope="module")
def wrapper(model, processor):
    return PolicyWrapper(model, processor)


def _bundle(out: Path, parts, processor) -> Path:
    """A real bundle around the policy parts (manifest + processor files), as export concept writes."""
    processor.save_pretrained(str(out / PROCESSOR_DIR))
    from conceptseg_edge.fileio import sha256_file

    files = {f"{PROCESSOR_DIR}/{p.name}": sha256_file(p) for p in sorted((out / PROCESSOR_DIR).iterdir())}
    manifest = BundleManifest(
        source=SourceInfo("tiny-qwen2.5-vl", None, None), preprocessing=Preprocessing(image_size=64),
        parts=parts, routes=("reason",), files=files,
    )
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def exported(model, processor, tmp_path_factory):
    """precision → (bundle dir, parts)."""
    out = {}
    for precision in ("fp32", "int8", "int4"):
        d = tmp_path_factory.mktemp(f"policy_{precision}")
        parts = export_policy(model, processor, d, precision=precision)
        out[precision] = (_bundle(d, parts, processor), parts)
    return out


@pytest.fixture(scope="module")
def policy(exported):
    return OnnxPolicy.from_bundle(exported["fp32"][0])


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- graphs


def test_fp32_parity_recorded_and_within_tolerance(exported, model):
    _, parts = exported["fp32"]
    assert set(parts) == TESTED_PARTS
    cfg = model.config.text_config
    specs = {
        "policy_vision": policy_vision_spec(cfg.hidden_size),
        "policy_embed": policy_embed_spec(cfg.hidden_size),
        "policy_decoder": policy_decoder_spec(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads,
                                              cfg.hidden_size // cfg.num_attention_heads, model.lm_head.out_features),
    }
    for name, part in parts.items():
        assert part.precision == "fp32" and part.parity.passed
        assert set(part.parity.max_abs_diff) == set(specs[name].output_names)
        for output, diff in part.parity.max_abs_diff.items():
            assert diff <= specs[name].atol[output]
        assert [t.name for t in part.inputs] == specs[name].input_names
    assert parts["policy_embed"].parity.max_abs_diff["inputs_embeds"] == 0.0
    assert parts["policy_decoder"].parity.max_abs_diff["last_hidden_state"] < 1e-4


def test_graph_io_names_and_dynamic_dims(exported):
    bundle, parts = exported["fp32"]
    for part in parts.values():
        engine = OrtEngine(bundle / part.file)
        assert [t.name for t in engine.inputs] == [t.name for t in part.inputs]
        assert [t.name for t in engine.outputs] == [t.name for t in part.outputs]
        assert not graph_op_types(bundle / part.file) & {"OneHot", "NonZero"}
    decoder = OrtEngine(bundle / parts["policy_decoder"].file)
    shapes = {t.name: t.shape for t in decoder.inputs} | {t.name: t.shape for t in decoder.outputs}
    assert shapes["past_key_values.0.key"] == (1, 2, "past_sequence", 32)
    assert shapes["present.1.value"] == (1, 2, "total_sequence", 32)
    assert shapes["position_ids"] == (3, 1, "sequence")


def test_decoder_attends_to_unexpanded_kv_heads(exported):
    """Grouped-query attention without ``repeat_kv``: the cache tensors feed the attention products
    as they are (kv_heads wide), never an Unsqueeze/Expand/Tile that copies them per query head.
    The tiny model has 4 query heads on 2 KV heads, so the fp32 parity cases cover the grouping."""
    import onnx

    bundle, parts = exported["fp32"]
    graph = onnx.load(str(bundle / parts["policy_decoder"].file)).graph
    presents = {o.name for o in graph.output if o.name.startswith("present.")}
    consumers = {n.op_type for n in graph.node if presents & set(n.input)}
    assert consumers == {"MatMul", "Transpose"}


def test_vision_graph_at_the_deployment_size(exported, model, deploy_processor):
    """600x600 (the paper's policy size) → 588x588 → a 42x42 patch grid, through the same graph."""
    bundle, parts = exported["fp32"]
    engine = OrtEngine(bundle / parts["policy_vision"].file)
    img = np.random.default_rng(3).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    feats = deploy_processor.image_processor(images=[img], return_tensors="pt")
    assert feats["image_grid_thw"].tolist() == [[1, 42, 42]]
    got = engine.run({"pixel_values": feats["pixel_values"].numpy(), "image_grid_thw": feats["image_grid_thw"].numpy()})
    with torch.no_grad():
        want = model.model.get_image_features(feats["pixel_values"], feats["image_grid_thw"]).pooler_output[0]
    assert got["image_embeds"].shape == (441, 128)
    assert np.abs(got["image_embeds"] - want.numpy()).max() < 1e-3


def test_export_raises_on_disagreement(model, processor, tmp_path):
    """Exports validate themselves: a reference that differs by 1e-2 fails the 1e-3 feature atol."""
    ref = vision_reference(model)
    off = lambda feeds: {k: v + 1e-2 for k, v in ref(feeds).items()}  # noqa: E731
    with pytest.raises(ExportParityError, match="image_embeds"):
        export_and_validate(VisionEncoderGraph(model.model.visual).eval(), policy_vision_spec(128),
                            vision_cases(processor)[:1], off, REFERENCE_NAME, tmp_path, 17)
    with pytest.raises(InputError, match="precision"):
        export_policy(model, processor, tmp_path, precision="fp16")
    with pytest.raises(InputError, match="--weight-storage|weight storage 'int8'"):
        export_policy(model, processor, tmp_path, weight_storage="int8")


def test_policy_graphs_take_fp16_weight_storage(model, processor, exported, tmp_path):
    """The policy graphs go through the same export path as SAM2 and the CTM: fp16-stored weights,
    parity at that storage's tolerances (the embedding Gather's 0 becomes the rounding bound)."""
    parts = export_policy(model, processor, tmp_path, weight_storage="fp16")
    fp32_bundle, fp32_parts = exported["fp32"]
    for name, part in parts.items():
        assert part.weight_storage == "fp16" and part.precision == "fp32" and part.parity.passed
        assert (tmp_path / part.file).stat().st_size <= 0.6 * (fp32_bundle / fp32_parts[name].file).stat().st_size
    fp16 = WEIGHT_STORAGES["fp16"]
    assert parts["policy_embed"].parity.atol["inputs_embeds"] == fp16.exact_atol
    assert 0 < parts["policy_embed"].parity.max_abs_diff["inputs_embeds"] <= fp16.exact_atol
    assert parts["policy_vision"].parity.atol["image_embeds"] == fp32_parts["policy_vision"].parity.atol["image_embeds"] * fp16.atol_scale


# ----------------------------------------------------------------------------- numpy ports


@pytest.mark.parametrize("hw", [(90, 120), (600, 600), (37, 300), (512, 384)])
def test_pixel_values_equal_the_hf_processor(processor, deploy_processor, hw):
    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    for proc in (processor, deploy_processor):
        want = proc.image_processor(images=[img], return_tensors="np")
        cfg = rt.PolicyImageConfig.from_dict(proc.image_processor.to_dict(), "test")
        pixel_values, grid = preprocess_policy_image(img, cfg)
        assert np.array_equal(grid[None], want["image_grid_thw"])
        assert pixel_values.dtype == np.float32 and np.array_equal(pixel_values, want["pixel_values"])


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prompt_ids_and_mrope_equal_transformers(wrapper, policy, image, num_images):
    images = [image, image[::-1, :, :].copy()][:num_images]
    inputs = wrapper.build_inputs(images, "camouflaged object segmentation")
    grids = [preprocess_policy_image(im, policy.image_config)[1] for im in images]
    ids = policy.build_input_ids(num_images, "camouflaged object segmentation", grids)
    assert np.array_equal(ids, inputs["input_ids"][0].numpy())
    positions, next_position = mrope_position_ids(ids, policy.tokenizer.image_token_id, grids, 2)
    if num_images:
        want, delta = wrapper.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        assert np.array_equal(positions, want[:, 0].numpy())
        assert next_position == len(ids) + int(delta)
        assert not np.array_equal(positions[0], positions[1])  # really 3-axis
    else:
        assert np.array_equal(positions, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
        assert next_position == len(ids)


def test_runtime_constants_match_the_tokenizer_module(processor):
    assert rt_tok.DEFAULT_SYSTEM_PROMPT == DEFAULT_SYSTEM_PROMPT
    assert (rt_tok.IM_END, rt_tok.END_OF_TEXT, rt_tok.IMAGE_PAD) == (EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
    tok = rt_tok.PolicyTokenizer(processor.tokenizer.backend_tokenizer)
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "dog"}]}]
    assert tok.prompt(1, "dog") == processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_mrope_rejects_mismatched_grids():
    ids = np.array([5, 9, 9, 9, 9, 6])
    with pytest.raises(InputError, match="does not match"):
        mrope_position_ids(ids, 9, [np.array([1, 4, 6])], 2)
    with pytest.raises(InputError, match="more grids"):
        mrope_position_ids(ids, 9, [np.array([1, 4, 4]), np.array([1, 4, 4])], 2)


# ----------------------------------------------------------------------------- generation at fp32


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_generate_reproduces_policy_wrapper(wrapper, policy, image, num_images):
    images = [image, image[:, ::-1, :].copy()][:num_images]
    text = "salient object segmentation"
    want = wrapper.generate(images, text, max_new_tokens=24)
    got = policy.generate(images if num_images != 1 else images[0], text, max_new_tokens=24)
    text_out, token_ids, hidden = got.text, got.token_ids, got.hidden_states
    assert token_ids.tolist() == want.token_ids.tolist() and len(token_ids) == 24
    assert text_out == want.text and "<think>" in text_out  # trained: the format is there
    assert hidden.shape == (24, 128) and hidden.dtype == np.float32
    assert np.abs(hidden - want.hidden_states.numpy()).max() < HIDDEN_ATOL
    expected = ["policy_preprocess", "policy_vision"] if num_images else []
    assert list(got.timings) == [*expected, "policy_prefill", "policy_decode"]
    assert got.new_tokens == 24 and got.decode_tokens_per_s > 0


def test_generate_stops_on_the_stop_token_like_torch(wrapper, policy):
    want = wrapper.generate([], "dog", max_new_tokens=160)
    got = policy.generate(None, "dog", max_new_tokens=160)
    assert got.token_ids.tolist() == want.token_ids.tolist()
    assert got.token_ids[-1] in policy.tokenizer.stop_ids and len(got.token_ids) < 160
    assert len(got.hidden_states) == len(got.token_ids)
    assert np.abs(got.hidden_states - want.hidden_states.numpy()).max() < HIDDEN_ATOL


def test_prefill_hidden_states_equal_prompt_hidden_states(wrapper, policy):
    with torch.no_grad():
        want = wrapper.prompt_hidden_states(wrapper.build_inputs([], "red circle")).numpy()
    got = policy.prefill_hidden_states("red circle")
    assert got.shape == want.shape and np.abs(got - want).max() < HIDDEN_ATOL
    assert list(policy.prefill(None, "red circle").timings) == ["policy_prefill"]


def test_bad_requests(policy, image):
    with pytest.raises(InputError, match="max_new_tokens"):
        policy.generate(image, "dog", max_new_tokens=0)
    with pytest.raises(InputError, match="empty"):
        policy.generate(None, "", max_new_tokens=4)
    with pytest.raises(InputError, match="image: float samples from 2 to 2"):  # floats must lie in [0, 1]
        policy.generate(np.full((4, 4), 2.0, np.float32), "dog", max_new_tokens=4)
    text_only = OnnxPolicy(None, policy.embed, policy.decoder, policy.tokenizer, policy.image_config)
    with pytest.raises(InputError, match="no vision graph"):
        text_only.generate(image, "dog", max_new_tokens=4)


# ----------------------------------------------------------------------------- quantized


#: The kernels that hold each precision's quantized weights.
QUANTIZED_OPS = {"int8": {"DynamicQuantizeMatMul", "MatMulInteger"}, "int4": {"MatMulNBits"}}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_decoders_meet_their_floors(exported, wrapper, precision):
    bundle, parts = exported[precision]
    assert {n: p.precision for n, p in parts.items()} == {
        "policy_vision": "fp32", "policy_embed": "fp32", "policy_decoder": precision}
    report = parts["policy_decoder"].quantized_parity
    assert parts["policy_decoder"].parity is None and report.passed and report.precision == precision
    measured = report.measures()
    assert set(report.floors) == set(measured) and all(measured[k] >= report.floors[k] for k in measured)
    assert report.tokens >= report.decisive_tokens > 0
    # Each precision's own kernel: int4 weights live only in MatMulNBits; an int8 graph (MatMulInteger
    # or DynamicQuantizeMatMul) must not pass as int4, nor a 4-bit one as int8.
    ops = graph_op_types(bundle / "policy_decoder.onnx")
    assert QUANTIZED_OPS[precision] & ops, (precision, sorted(ops))
    assert not (set().union(*(v for k, v in QUANTIZED_OPS.items() if k != precision)) & ops), (precision, sorted(ops))
    fp32_size = (exported["fp32"][0] / "policy_decoder.onnx").stat().st_size
    assert (bundle / "policy_decoder.onnx").stat().st_size < fp32_size

    # The test floors pin what was measured.
    for key, floor in TEST_FLOORS[precision].items():
        assert measured[key] >= floor, (key, measured)
    # The bundle loads, and free-running decoding keeps the format and the first tokens.
    quant = OnnxPolicy.from_bundle(bundle)
    free = quant.generate(None, "camouflaged object segmentation", 24)
    ref = wrapper.generate([], "camouflaged object segmentation", 24)
    assert free.text.startswith("<think>") and free.token_ids[:4].tolist() == ref.token_ids[:4].tolist()


def test_quantized_gate_catches_a_broken_graph(exported, model, processor, tmp_path):
    """Weights shuffled inside each matrix (same values and scale, like mis-packed blocks) must fail."""
    import shutil

    import onnx
    from onnx import numpy_helper

    bundle, _ = exported["int8"]
    for name in ("policy_vision.onnx", "policy_embed.onnx"):
        shutil.copy(bundle / name, tmp_path / name)
    graph = onnx.load(str(exported["fp32"][0] / "policy_decoder.onnx"))
    rng = np.random.default_rng(0)
    for init in graph.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.reshape(-1)).reshape(w.shape), init.name))
    onnx.save(graph, str(tmp_path / "policy_decoder.onnx"))
    with pytest.raises(ExportParityError, match="decisive_token_agreement"):
        quantized_decoder_parity(model, processor, tmp_path, bundle / PROCESSOR_DIR, "int8")


def test_quantization_starts_from_an_fp32_stored_fp32_graph(exported, tmp_path):
    """Quantizers read weights from initializers: an fp16-stored graph (weights behind Casts) is
    refused rather than silently left unquantized, and so is an unknown precision."""
    import dataclasses

    from conceptseg_edge.export.quantize import quantize_part

    bundle, parts = exported["fp32"]
    decoder = parts["policy_decoder"]
    with pytest.raises(InputError, match="fp32-stored weights"):
        quantize_part(dataclasses.replace(decoder, weight_storage="fp16"), bundle, tmp_path, "int8")
    with pytest.raises(InputError, match="precision 'int2'"):
        quantize_part(decoder, bundle, tmp_path, "int2")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- torch-free runtime


def test_runtime_policy_runs_without_torch(exported):
    bundle, _ = exported["fp32"]
    code = (
        "import sys, numpy as np\n"
        "from conceptseg_edge.runtime.policy import OnnxPolicy\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        f"p = OnnxPolicy.from_bundle({str(bundle)!r})\n"
        "img = np.zeros((64, 80, 3), np.uint8)\n"
        "out = p.generate(img, 'dog', 3)\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(bad, out.token_ids.tolist(), out.hidden_states.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("[] ") and "(3, 128)" in res.stdout


def test_manifest_round_trips_the_policy_parts(exported):
    from conceptseg_edge.manifest import load_bundle

    bundle, parts = exported["int4"]
    loaded = load_bundle(bundle)
    assert loaded.part("policy_decoder") == parts["policy_decoder"]
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["parts"]["policy_decoder"]["precision"] == "int4"
