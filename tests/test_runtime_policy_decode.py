"""``OnnxPolicy.generate``'s decode loop on real ORT sessions of toy graphs, without torch.

The toy decoder has the policy decoder's IO (inputs_embeds, 3-axis position_ids, attention_mask,
past_key_values.* → logits, last_hidden_state, present.*) and makes every output depend on the whole
cache, the position and the mask length, so a step fed a stale or misplaced cache changes the tokens.
The IO-bound loop (``OrtEngine``) must equal, bit for bit, the plain ``run`` loop (an engine with
only ``run``, as TensorRT or a Triton BLS engine offers) and the embed graph runs once per token id.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save_model

from conceptseg_edge.runtime import policy as rt
from conceptseg_edge.runtime.engine import OrtEngine
from conceptseg_edge.runtime.policy import OnnxPolicy
from conceptseg_edge.runtime.policy_image import PolicyImageConfig
from conceptseg_edge.runtime.policy_tokenizer import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    PolicyTokenizer,
)

D = 4
SPECIALS = [IM_START, IM_END, END_OF_TEXT, VISION_START, VISION_END, IMAGE_PAD]
WORDS = ["[UNK]", *SPECIALS, "system", "user", "assistant", "find", "the", "cat"]
VOCAB = len(WORDS)


class RunOnly:
    """A real engine seen through ``run`` only: the path for engines that cannot bind."""

    def __init__(self, engine: OrtEngine) -> None:
        self.inputs, self.outputs, self.provider = engine.inputs, engine.outputs, engine.provider
        self._engine = engine

    def run(self, feeds):
        return self._engine.run(feeds)


class Counting(RunOnly):
    """Counts calls (instrumentation around a real session, not a stand-in)."""

    calls = 0

    def run(self, feeds):
        self.calls += 1
        return super().run(feeds)


def _save(graph, path) -> OrtEngine:
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return OrtEngine(path)


def _decoder_graph(rng: np.random.Generator):
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    w = numpy_helper.from_array(rng.standard_normal((D, VOCAB)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "scale")
    nodes = [
        helper.make_node("Unsqueeze", ["inputs_embeds", "one"], ["x4"]),  # (1, 1, S, D)
        helper.make_node("Sin", ["x4"], ["sin4"]),
    ]
    for kind, src in (("key", "x4"), ("value", "sin4")):
        nodes.append(helper.make_node("Concat", [f"past_key_values.0.{kind}", src], [f"present.0.{kind}"], axis=2))
    nodes += [
        helper.make_node("ReduceSum", ["present.0.key", "axes"], ["ksum"], keepdims=0),  # (1, D)
        helper.make_node("ReduceSum", ["present.0.value", "axes"], ["vsum"], keepdims=0),
        helper.make_node("Mul", ["ksum", "scale"], ["ks"]),
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=f),
        helper.make_node("ReduceSum", ["pos_f"], ["pos_sum"], keepdims=0),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f),
        helper.make_node("ReduceSum", ["mask_f"], ["mask_sum"], keepdims=0),
        helper.make_node("Add", ["pos_sum", "mask_sum"], ["pm"]),
        helper.make_node("Mul", ["pm", "scale"], ["pm_s"]),
        helper.make_node("Add", ["ks", "vsum"], ["kv"]),
        helper.make_node("Unsqueeze", ["kv", "one"], ["kv3"]),  # (1, 1, D)
        helper.make_node("Add", ["inputs_embeds", "kv3"], ["h0"]),
        helper.make_node("Add", ["h0", "pm_s"], ["h1"]),
        helper.make_node("Sin", ["h1"], ["last_hidden_state"]),
        helper.make_node("MatMul", ["last_hidden_state", "w"], ["logits"]),
    ]
    return helper.make_graph(
        nodes,
        "policy_decoder",
        [
            helper.make_tensor_value_info("inputs_embeds", f, [1, "seq", D]),
            helper.make_tensor_value_info("position_ids", i64, [3, 1, "seq"]),
            helper.make_tensor_value_info("attention_mask", i64, [1, "total"]),
            *(helper.make_tensor_value_info(f"past_key_values.0.{k}", f, [1, 1, "past", D]) for k in ("key", "value")),
        ],
        [
            helper.make_tensor_value_info("logits", f, [1, "seq", VOCAB]),
            helper.make_tensor_value_info("last_hidden_state", f, [1, "seq", D]),
            *(helper.make_tensor_value_info(f"present.0.{k}", f, [1, 1, "total", D]) for k in ("key", "value")),
        ],
        initializer=[w, axes, one, scale],
    )


def _embed_graph(rng: np.random.Generator):
    table = numpy_helper.from_array(rng.standard_normal((VOCAB, D)).astype(np.float32), "table")
    return helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["inputs_embeds"])],
        "policy_embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "seq", D])],
        initializer=[table],
    )


def _tokenizer() -> PolicyTokenizer:
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return PolicyTokenizer(tok)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("toy_policy")
    return _save(_embed_graph(rng), root / "policy_embed.onnx"), _save(_decoder_graph(rng), root / "policy_decoder.onnx")


def test_bound_decoding_equals_run_decoding_bit_for_bit(graphs):
    embed, decoder = graphs
    tok = _tokenizer()
    bound = OnnxPolicy(None, Counting(embed), decoder, tok, PolicyImageConfig())
    plain = OnnxPolicy(None, embed, RunOnly(decoder), tok, PolicyImageConfig())
    fed: set[int] = set()
    for text in ("find the cat", "the cat", "find the cat"):
        a = bound.generate(None, text, max_new_tokens=12)
        b = plain.generate(None, text, max_new_tokens=12)
        assert len(a.token_ids) > 2  # real decoding steps happened
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.hidden_states, b.hidden_states)
        assert a.hidden_states.dtype == np.float32 and a.hidden_states.shape == (len(a.token_ids), D)
        fed |= {int(t) for t in a.token_ids[:-1]}  # the last token is never fed back
    # one embed call per prefill, then one per distinct id fed back, however often it recurs
    assert bound.embed.calls == 3 + len(fed)


def test_embedding_cache_is_capped(graphs, monkeypatch):
    embed, decoder = graphs
    monkeypatch.setattr(rt, "EMBED_CACHE_TOKENS", 1)
    policy = OnnxPolicy(None, Counting(embed), decoder, _tokenizer(), PolicyImageConfig())
    reference = OnnxPolicy(None, embed, decoder, _tokenizer(), PolicyImageConfig())
    out = policy.generate(None, "find the cat", max_new_tokens=12)
    np.testing.assert_array_equal(out.token_ids, reference.generate(None, "find the cat", 12).token_ids)
    fed = [int(t) for t in out.token_ids[:-1]]
    # one prefill call; then only the first id fed back stays cached, every other id is embedded each time
    assert policy.embed.calls == 1 + len(fed) - (fed.count(fed[0]) - 1)


def test_generation_carries_typed_timings_and_its_token_count(graphs):
    embed, decoder = graphs
    policy = OnnxPolicy(None, embed, decoder, _tokenizer(), PolicyImageConfig())
    out = policy.generate(None, "find the cat", max_new_tokens=5)
    assert list(out.timings) == ["policy_prefill", "policy_decode"]  # no images: no vision stages
    assert out.new_tokens == len(out.token_ids) == 5 and isinstance(out.new_tokens, int)
    assert out.decode_tokens_per_s == pytest.approx(4 / (out.timings.policy_decode / 1e3))
    one = policy.generate(None, "find the cat", max_new_tokens=1)
    assert one.new_tokens == 1 and one.decode_tokens_per_s is None
    assert list(policy.prefill(None, "the cat").timings) == ["policy_prefill"]
