"""tools.compare: the roofline arithmetic, the rows and the table, the prompts, the float-GGUF
conversion (read back by kvloom's own loader), and one quick end-to-end run on a tiny checkpoint."""

import json
import sys

import gguf
import jax
import numpy as np
import pytest

from kvloom.engine.models.loader import _unpermute_rope, load_model, resolve_source
from kvloom.tools import compare
from kvloom.tools.cli import build_parser
from kvloom.tools.command_args import COMPARE_WORKLOADS, PEERS

pytestmark = pytest.mark.timeout(180)


# ---- roofline, rows, table ----------------------------------------------------------------------

def test_roofline_arithmetic():
    roof = compare.Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000)
    assert roof.compute_tok_s == pytest.approx(1000.0)  # 100e9 / (2 x 50e6)
    assert roof.weight_bytes == 200_000_000  # float32
    assert roof.memory_tok_s == pytest.approx(100.0)  # 20e9 / 200e6, batch 1
    assert roof.decode_tok_s(1) == pytest.approx(100.0)
    assert roof.decode_tok_s(8) == pytest.approx(800.0)  # the batch shares each weight read
    assert roof.decode_tok_s(32) == pytest.approx(1000.0)  # compute-bound
    # the query once, then 16 items of 16 tokens: 384 tokens for 16 items
    assert roof.score_items_s(128, 16, 16) == pytest.approx(1000.0 * 16 / 384)
    assert roof.to_json()["peak_gflops"] == pytest.approx(100.0)

    figs = compare.figures(compare.FULL, COMPARE_WORKLOADS, roof)
    assert [f.key for f in figs] == ["decode@1", "decode@8", "decode@32", "prefill", "shared-prefix", "score"]
    by_key = {f.key: f for f in figs}
    assert by_key["decode@8"].roofline == pytest.approx(800.0)
    assert by_key["prefill"].roofline == pytest.approx(1000.0) and "512-tok" in by_key["prefill"].label
    assert by_key["shared-prefix"].roofline == pytest.approx(1000.0)  # 16 x 100 > compute
    assert "16x 400+32" in by_key["shared-prefix"].label and by_key["score"].unit == "items/s"
    assert [f.key for f in compare.figures(compare.QUICK, ["prefill"], roof)] == ["prefill"]


def test_rows_pair_each_peer_with_kvloom_in_its_own_mode():
    roof = compare.Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000)
    figs = compare.figures(compare.FULL, ["decode", "score"], roof)
    measurements = {
        "kvloom": {"decode@1": {"value": 50.0}, "decode@8": {"value": 400.0}, "score": {"value": 20.0}},
        "kvloom-http": {"decode@1": {"value": 40.0}},
        "hf": {"decode@1": {"value": 25.0}, "decode@8": {"value": 100.0}, "score": {"value": 10.0}},
        "llamacpp-server": {"decode@1": {"value": 80.0}},
    }
    rows = compare.build_rows(figs, measurements, ["hf", "llamacpp", "llamacpp-server"])
    assert [(r["key"], r["mode"]) for r in rows] == [
        ("decode@1", "in process"), ("decode@1", "HTTP"), ("decode@8", "in process"), ("score", "in process")]
    first, http = rows[0], rows[1]
    assert first["peers"] == {"hf": 25.0, "llamacpp": None, "llamacpp-server": None}
    assert first["kvloom_over_peer"]["hf"] == pytest.approx(2.0)
    assert first["kvloom_over_peer"]["llamacpp"] is None
    assert first["kvloom_over_roofline"] == pytest.approx(0.5)  # 50 of 100 tok/s
    assert http["peers"] == {"hf": None, "llamacpp": None, "llamacpp-server": 80.0}
    assert http["kvloom_over_peer"]["llamacpp-server"] == pytest.approx(0.5)
    assert rows[2]["kvloom_over_roofline"] == pytest.approx(0.5)  # 400 of 800

    cells = compare.table_cells(rows, {"hf": "transformers", "llamacpp-server": "llama.cpp-server F32"})
    assert cells[0] == ["figure", "kvloom", "transformers", "llama.cpp-server F32", "kvloom/transformers",
                        "kvloom/llama.cpp-server F32", "kvloom/roofline", "roofline"]
    assert cells[1] == ["decode tok/s @1 (in process)", "50.0", "25.0", "-", "2.00x", "-", "50.0%", "100.0"]
    assert cells[2][2:6] == ["-", "80.0", "-", "0.50x"]
    lines = compare.format_table(cells)
    assert len({len(line) for line in lines}) == 1  # right-aligned columns end together
    assert lines[1].startswith("decode tok/s @1 (in process)  ")
    assert lines[1].split()[-2:] == ["50.0%", "100.0"]


def test_report_lines_list_skipped_peers():
    roof = compare.Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000)
    report = dict(model="m", num_parameters=50_000_000, cpu_count=2, roofline=roof.to_json(),
                  rows=compare.build_rows(compare.figures(compare.QUICK, ["prefill"], roof),
                                          {"kvloom": {"prefill": {"value": 10.0}}}, ["llamacpp"]),
                  peers={"llamacpp": dict(label="llama.cpp", mode="in process", status="skipped",
                                          message="llama-cpp-python is not installed")})
    lines = compare.report_lines(report)
    assert "skipped: llama.cpp: llama-cpp-python is not installed" in lines
    header = next(line for line in lines if line.startswith("figure"))
    assert "llama.cpp" not in header  # a skipped peer gets no column


# ---- prompts and options ------------------------------------------------------------------------

def test_prompt_sets_have_the_shapes_asked_for():
    def encode(text):  # a stand-in tokenizer: one or two ids per word
        return [id_ for word in text.split() for id_ in ([len(word) + 10] * (1 + len(word) % 2))]

    sizes = compare.QUICK
    prompts = compare.build_prompt_set(encode, np.random.default_rng(0), sizes)
    assert len(prompts.warmup) == max(sizes.concurrency)
    assert {c: len(p) for c, p in prompts.decode.items()} == {c: c for c in sizes.concurrency}
    assert all(len(p) == sizes.prompt_tokens for ps in prompts.decode.values() for p in ps)
    assert len(prompts.prefill) == sizes.repeats
    assert all(len(p) == sizes.prefill_tokens for p in prompts.prefill)
    assert len(prompts.shared) == sizes.num_shared_requests
    assert all(len(p) == sizes.prefix_tokens + sizes.unique_tokens for p in prompts.shared)
    assert all(p[:sizes.prefix_tokens] == prompts.shared[0][:sizes.prefix_tokens] for p in prompts.shared)
    assert len(prompts.score) == sizes.repeats + 1  # one warm-up
    query, items = prompts.score[0]
    assert len(query) == sizes.query_tokens and np.shape(items) == (sizes.num_items, sizes.item_tokens)
    assert len(set(prompts.label_ids)) == 2

    texts = compare.as_text(prompts, lambda ids: " ".join(map(str, ids)))
    assert texts.prefill[0].split() == [str(i) for i in prompts.prefill[0]]
    assert texts.score == prompts.score


def test_label_logprobs_and_rope_permutation():
    logits = np.array([1.0, 2.0, 3.0])
    expected = logits - np.log(np.exp(logits).sum())
    assert compare.label_logprobs(logits, [2, 0]) == pytest.approx([expected[2], expected[0]])
    weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    assert np.array_equal(_unpermute_rope(compare.permute_rope(weight, 4), 4), weight)


def test_options():
    args = build_parser().parse_args(["compare", "--quick", "--peers", "none", "--workloads", "prefill,score",
                                      "--concurrency", "2,3", "--new-tokens", "5"])
    assert args.peers == () and args.workloads == ("prefill", "score")
    sizes = compare.sizes_from_args(args)
    assert sizes.concurrency == (2, 3) and sizes.new_tokens == 5
    assert sizes.prefill_tokens == compare.QUICK.prefill_tokens
    defaults = build_parser().parse_args(["compare"])
    assert defaults.peers == PEERS and compare.sizes_from_args(defaults) == compare.FULL
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--peers", "hf,vllm"])


class FakeLlama:
    """The few calls tools.compare makes on llama_cpp.Llama, answering with fixed logits."""

    def __init__(self, model_path, n_ctx, **kwargs):
        assert kwargs["logits_all"] is False and kwargs["n_threads"] == 2
        self.n_ctx, self.n_tokens, self.calls = n_ctx, 0, []
        self.ctx = object()
        FakeLlama.last = self

    def tokenize(self, text: bytes, add_bos: bool, special: bool):
        return [len(w) for w in text.decode().split()]

    def create_completion(self, prompt, max_tokens, temperature, repeat_penalty):
        assert isinstance(prompt, list) and len(prompt) + max_tokens <= self.n_ctx and temperature == 0.0
        self.calls.append(("complete", len(prompt), max_tokens))
        return {"usage": {"completion_tokens": max_tokens}}

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        self.calls.append(("eval", self.n_tokens, len(tokens)))
        self.n_tokens += len(tokens)

    def n_vocab(self):
        return 8


def test_llamacpp_in_process_with_a_fake_module(monkeypatch):
    import ctypes
    import types

    logits = (ctypes.c_float * 8)(*range(8))
    fake = types.SimpleNamespace(Llama=FakeLlama, llama_get_logits_ith=lambda ctx, i: ctypes.cast(
        logits, ctypes.POINTER(ctypes.c_float)))
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    sizes = compare.QUICK

    def encode(text):
        return [len(w) for w in text.split()]

    prompts = compare.build_prompt_set(encode, np.random.default_rng(0), sizes)
    out = compare.bench_llamacpp("model.gguf", prompts, sizes, COMPARE_WORKLOADS, 2, ("a bb", [1, 2]))
    assert set(out) == {"decode@1", "decode@4", "prefill", "shared-prefix", "score"}
    assert all(m["value"] > 0 and m["same_tokenizer"] for m in out.values())
    assert out["decode@4"]["num_tokens"] == 4 * sizes.new_tokens
    # scoring: the query once, then every item right after it
    q, i = sizes.query_tokens, sizes.item_tokens
    evals = FakeLlama.last.calls[-(sizes.num_items + 1):]
    assert evals == [("eval", 0, q)] + [("eval", q, i)] * sizes.num_items


# ---- the float GGUF llama.cpp runs ----------------------------------------------------------------

def _leaves(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _quantize_q4_1(src: str, out: str) -> None:
    """A Q4_1 copy of a float GGUF (2-d tensors quantized, metadata copied)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    for tensor in reader.tensors:
        array = np.asarray(tensor.data, np.float32)
        if array.ndim == 2:
            writer.add_tensor(tensor.name, gguf.quants.quantize(array, q4_1), raw_dtype=q4_1)
        else:
            writer.add_tensor(tensor.name, array)
    compare._write(writer)


def test_float_gguf_from_a_checkpoint_and_from_a_quantized_gguf(tiny_llama, tmp_path, monkeypatch):
    from kvloom.engine.tokenizer import CACHE_DIR_ENV, Tokenizer

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "kvloom-cache"))  # the GGUF tokenizer's cache
    source = resolve_source(tiny_llama)
    f32 = compare.float_gguf(source, "f32", str(tmp_path / "cache"))
    assert compare.float_gguf(source, "f32", str(tmp_path / "cache")) == f32  # converted once
    _, cfg, params = load_model(tiny_llama)
    _, cfg_f32, params_f32 = load_model(f32)
    assert cfg_f32.num_heads == cfg.num_heads and cfg_f32.vocab_size == cfg.vocab_size
    assert cfg_f32.tie_word_embeddings and cfg_f32.eos_token_ids == cfg.eos_token_ids
    want, got = _leaves(params), _leaves(params_f32)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    text = "The quick brown fox jumps over the lazy dog."
    assert (Tokenizer.load(resolve_source(f32)).encode(text, add_special_tokens=False)
            == Tokenizer.load(source).encode(text, add_special_tokens=False))

    q4 = str(tmp_path / "tiny.Q4_1.gguf")
    _quantize_q4_1(f32, q4)
    assert compare.gguf_file_type_name(q4) == "Q4_1"
    f16 = compare.float_gguf(resolve_source(q4), "f16", str(tmp_path / "cache"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(f16).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    _, _, params_q4 = load_model(q4)
    _, _, params_f16 = load_model(f16)
    dequantized, converted = _leaves(params_q4), _leaves(params_f16)
    assert all(np.allclose(dequantized[k], converted[k], rtol=1e-3, atol=1e-3) for k in dequantized)

    # a conversion that fails falls back to the original file, labelled honestly
    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(compare, "convert_gguf", fail)
    model_file = compare.LlamaCppModelFile(resolve_source(q4), "f32", str(tmp_path / "other"))
    path, tag, note = model_file.get()
    assert path == q4 and tag == "(Q4_1)" and "disk full" in note
    assert compare.peer_label("llamacpp", tag) == "llama.cpp (Q4_1)"


# ---- end to end ---------------------------------------------------------------------------------

def test_quick_run_on_a_tiny_checkpoint(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed, whatever this machine has
    out = tmp_path / "compare.json"
    args = build_parser().parse_args([
        "compare", "--model", tiny_llama, "--quick", "--peers", "hf,llamacpp", "--json", str(out),
        "--max-running", "4", "--max-model-len", "256", "--page-size", "4", "--num-pages", "512",
        "--chunk-size", "32", "--max-tokens-per-step", "64", "--max-prefill-seqs", "2",
        "--gguf-cache-dir", str(tmp_path / "gguf"),
        # keep the cache conftest chose: the run sets process-wide JAX config
        "--jax-cache-dir", jax.config.jax_compilation_cache_dir,
    ])
    assert compare.main_from_args(args) == 0

    report = json.loads(out.read_text())
    assert report["peers"]["hf"]["status"] == "ok"
    llamacpp = report["peers"]["llamacpp"]
    assert llamacpp["status"] == "skipped" and "llama-cpp-python is not installed" in llamacpp["message"]
    assert "llamacpp-server" not in report["peers"]
    assert report["roofline"]["compute_tok_s"] > 0 and report["roofline"]["memory_tok_s_batch1"] > 0
    assert report["machine"]["bandwidth"]["bytes_per_s"] > 0

    rows = {(r["key"], r["mode"]): r for r in report["rows"]}
    keys = ["decode@1", "decode@4", "prefill", "shared-prefix", "score"]
    assert set(rows) == {(k, m) for k in keys for m in ("in process", "HTTP")}
    for key in keys:
        local, http = rows[key, "in process"], rows[key, "HTTP"]
        assert local["kvloom"] > 0 and local["peers"]["hf"] > 0, key  # the transformers column is filled
        assert local["kvloom_over_peer"]["hf"] > 0 and 0 < local["kvloom_over_roofline"]
        assert local["peers"]["llamacpp"] is None and local["kvloom_over_peer"]["llamacpp"] is None
        assert http["kvloom"] > 0 and http["peers"] == {"hf": None, "llamacpp": None}, key
    assert report["measurements"]["hf"]["decode@4"]["num_tokens"] == 4 * compare.QUICK.new_tokens

    printed = capsys.readouterr().out
    assert "kvloom/transformers" in printed and "decode tok/s @4 (in process)" in printed
    assert "skipped: llama.cpp: llama-cpp-python is not installed" in printed
