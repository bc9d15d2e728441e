"""Tiny tokenizer, image-only processor, and the policy wrapper's decode-time hidden states.

Oracle for the hidden states: a teacher-forced forward over prompt + completion (the official
code's second pass). Tolerance: atol 1e-5, rtol 0 on post-norm states of magnitude ~1; measured
max |diff| is 1.2e-6 to 1.5e-6 on this CPU (float32), with or without images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BatchFeature

from conceptseg_edge.errors import CheckpointError, InputError
from conceptseg_edge.models.policy import (
    ConceptSegProcessor,
    PolicyWrapper,
    build_policy,
    build_processor,
    load_processor,
    tiny_policy_config,
)
from conceptseg_edge.models.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    train_tiny_tokenizer,
)

ATOL = 1e-5
TEST_MAX_PIXELS = 112 * 112  # 8x8 patches -> 16 image tokens per image


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_processor(tokenizer, max_pixels=TEST_MAX_PIXELS)


@pytest.fixture(scope="module")
def wrapper(tokenizer, processor):
    return PolicyWrapper(build_policy(tiny_policy_config(tokenizer), seed=0), processor)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "text",
    [
        "<think>The red circle is at the top left.</think> <rule>r</rule> "
        "<check>[1,2,30,40]</check> <bbox>[10,200,300,599]</bbox> <answer>red circle</answer>",
        "camouflaged object segmentation",
        "unseen: héllo wörld — 漢字 🙂\n\t  trailing  ",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>x<|im_end|>\n",
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_save_load(tokenizer, tmp_path: Path) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer("<|image_pad|>")["input_ids"] == [ids[5]]
    assert tokenizer("[123,45]")["input_ids"][1:4] == tokenizer("123")["input_ids"]  # digits split one by one
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "<think>a</think><bbox>[1,2,3,4]</bbox><|im_end|>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.eos_token == "<|im_end|>" and again.pad_token == "<|endoftext|>"
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "missing")


def test_chat_template_is_qwen_style(processor) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "dog"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>dog<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def write_qwen_layout(tokenizer, path: Path) -> None:
    """Lay processor files out as a released Qwen2.5-VL repo does (stock class names, top-level pixels)."""
    tokenizer.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    template = tokenizer.chat_template
    (path / "chat_template.jinja").unlink(missing_ok=True)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )


def test_processor_loads_ours_and_qwens_layout_alike(tokenizer, processor, image, tmp_path: Path) -> None:
    ours, qwen = tmp_path / "ours", tmp_path / "qwen"
    processor.save_pretrained(ours)
    write_qwen_layout(tokenizer, qwen)
    a = load_processor(ours)
    b = load_processor(qwen, max_pixels=TEST_MAX_PIXELS)
    assert isinstance(a, ConceptSegProcessor) and isinstance(b, ConceptSegProcessor)
    # AutoProcessor finds our class through the registration, not the bare tokenizer.
    assert isinstance(AutoProcessor.from_pretrained(ours, local_files_only=True), ConceptSegProcessor)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>red circle<|im_end|>\n"
    ref = processor(images=[image], text=[prompt], return_tensors="pt")
    for loaded in (a, b):
        got = loaded(images=[image], text=[prompt], return_tensors="pt")
        assert set(got) == set(ref)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    assert load_processor(qwen).image_processor.size.longest_edge == 12845056
    with pytest.raises(CheckpointError):
        load_processor(tmp_path / "missing")


@pytest.mark.parametrize("num_images", [1, 2, 0])
def test_decode_time_states_equal_teacher_forced(wrapper, image, num_images: int) -> None:
    images = [image] * num_images
    out = wrapper.generate(images, "red circle", max_new_tokens=12)
    steps = len(out.token_ids)
    assert 1 <= steps <= 12
    assert out.hidden_states.shape == (steps, wrapper.hidden_size)
    assert out.text == wrapper.processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    inputs = wrapper.build_inputs(images, "red circle")
    assert ("pixel_values" in inputs) == bool(num_images)
    with torch.no_grad():
        oracle = wrapper.teacher_forced_hidden_states(inputs, out.token_ids)
        prefill = wrapper.prompt_hidden_states(inputs)
    torch.testing.assert_close(out.hidden_states, oracle, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.hidden_states[0], prefill[-1], rtol=0, atol=ATOL)


def test_teacher_forcing_needs_mm_token_type_ids_with_images(wrapper, image) -> None:
    inputs = wrapper.build_inputs([image], "red circle")
    stripped = BatchFeature({k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    with pytest.raises(InputError, match="mm_token_type_ids"):
        wrapper.teacher_forced_hidden_states(stripped, [5, 6])


def test_sampling_and_bad_requests(wrapper, image) -> None:
    torch.manual_seed(1)
    a = wrapper.generate([image], "dog", max_new_tokens=6, greedy=False)
    torch.manual_seed(1)
    b = wrapper.generate([image], "dog", max_new_tokens=6, greedy=False)
    assert torch.equal(a.token_ids, b.token_ids)
    assert a.hidden_states.shape == (len(a.token_ids), wrapper.hidden_size)
    with pytest.raises(InputError):
        wrapper.generate([image], "", max_new_tokens=4)
    with pytest.raises(InputError):
        wrapper.generate([image], "dog", max_new_tokens=0)
    two = wrapper.build_inputs([], "dog")
    two = BatchFeature({k: v.repeat(2, 1) for k, v in two.items()})
    with pytest.raises(InputError, match="input_ids"):
        wrapper.generate_from_inputs(two, max_new_tokens=2)


def test_immediate_eos_gives_one_row(tokenizer, processor) -> None:
    """All-zero logits make greedy pick id 0 (<|endoftext|>), a stop token: T = 1, empty text."""
    model = build_policy(tiny_policy_config(tokenizer), seed=1)
    torch.nn.init.zeros_(model.lm_head.weight)
    wrapper = PolicyWrapper(model, processor)
    out = wrapper.generate([], "shadow", max_new_tokens=8)
    assert out.token_ids.tolist() == [0] and out.text == ""
    with torch.no_grad():
        prefill = wrapper.prompt_hidden_states(wrapper.build_inputs([], "shadow"))
    torch.testing.assert_close(out.hidden_states, prefill[-1:], rtol=0, atol=ATOL)


def test_tiny_config_shapes(tokenizer, wrapper) -> None:
    cfg = wrapper.model.config
    assert cfg.text_config.vocab_size == len(tokenizer)
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size == 128
    section = cfg.text_config.rope_parameters["mrope_section"]
    assert sum(section) == 128 // 4 // 2
