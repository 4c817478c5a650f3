"""HumanEval harness: templates, post-processing, --check-harness, custom problem files, and the
whole CLI path end to end with a tiny random Llama exported to a temp folder (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_mft.evaluate.humaneval import build_program, load_problems  # noqa: E402
from megatron_mft.evaluate.prompts import PromptTemplate, generation_done, postprocess  # noqa: E402
from megatron_mft.evaluate.sandbox import SandboxLimits, run_many  # noqa: E402


def cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_mft.evaluate", "humaneval", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_mft_template_is_the_training_chat_format():
    t = PromptTemplate("mft", instruction="Complete:\n{prompt}")
    assert t.render("def f():\n") == (
        "<|role_start|>human<|role_end|>Complete:\ndef f():\n<|role_start|>bot<|role_end|>")
    s = PromptTemplate("mft", instruction="{prompt}", system="You are a coder.")
    assert s.render("x").startswith("<|role_start|>system<|role_end|>You are a coder.<|role_start|>human")
    assert PromptTemplate("plain").render("def f():\n") == "def f():\n"
    with pytest.raises(ValueError):
        PromptTemplate("mft", instruction="no field")


def test_postprocess_full_function_in_a_code_block():
    raw = ("Sure, here it is:\n```python\nimport math\n\ndef f(x):\n    return math.floor(x)\n\n"
           "print(f(2.5))\nassert f(1) == 1\n```\nThis uses floor.<|role_start|>human")
    assert postprocess(raw, "f") == "\nimport math\n\ndef f(x):\n    return math.floor(x)\n"
    # unterminated block (max_new_tokens reached), no language tag
    assert postprocess("```\ndef f(x):\n    return x", "f") == "\ndef f(x):\n    return x\n"
    # module-level code before the function is kept, even a string with unindented lines
    raw = '```python\nDOC = """\nnot code\n"""\ndef f(x):\n    return x\nf(1)\n```'
    assert postprocess(raw, "f") == '\nDOC = """\nnot code\n"""\ndef f(x):\n    return x\n'
    # unparsable tail (cut mid-statement): the line heuristic still drops the driver code
    raw = "```python\ndef f(x):\n    return x\n\ndef g():\n    pass\nprint(f(1))\ny = ("
    assert postprocess(raw, "f") == "\ndef f(x):\n    return x\n\ndef g():\n    pass\n"


def test_postprocess_body_continuation_stops_at_unindented_code():
    raw = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert postprocess(raw, "f") == "    return x + 1\n"
    assert postprocess("    y = 1\n    return y\nif __name__ == '__main__':\n    f()", "f") == "    y = 1\n    return y\n"
    assert postprocess("    return 1</s>garbage", "f") == "    return 1\n"


def _metaspace_tokenizer(path: Path):
    """A SentencePiece-like (Metaspace, prefix on every segment) tokenizer with the role markers as
    added tokens: encoding the whole prompt string puts a '▁' before 'human', 'Complete', 'bot',
    which training's segment-wise encoding does not."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.train_from_iterator(["def add(a, b):\n    return a + b\n", "Complete human bot system",
                            string.printable] * 4,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["<|role_start|>", "<|role_end|>"])
    tok.save_pretrained(path)
    return tok


def test_training_encoding_matches_the_training_data_token_for_token(tmp_path, caplog):
    from megatron_mft.data.records import Record, Turn
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer
    from megatron_mft.evaluate.encoding import PromptEncoder
    from megatron_mft.evaluate.humaneval import _log_prompt_diagnostics

    tok = _metaspace_tokenizer(tmp_path)
    t = PromptTemplate("mft", instruction="Complete:\n{prompt}")
    enc = PromptEncoder(str(tmp_path), tok, t, "training", None)
    text, ids = enc.encode("def add(a, b):\n")
    # a training sample with the same human turn starts with exactly these ids
    fmt = ChatFormatter(load_template("mftcoder"), load_tokenizer(str(tmp_path)))
    sample, _ = fmt.encode([Record(turns=(Turn("human", "Complete:\ndef add(a, b):\n"),
                                          Turn("bot", "    return a + b\n")))])[0]
    assert sample.tolist()[: len(ids)] == ids
    assert ids[0] == tok.convert_tokens_to_ids("<|role_start|>") and enc.add_special_tokens is False
    # the naive string encoding differs here, and the log says so
    _, naive = PromptEncoder(str(tmp_path), tok, t, "text", None).encode("def add(a, b):\n")
    assert naive != ids
    with caplog.at_level("INFO"):
        info = _log_prompt_diagnostics(enc, "t/0", text, ids)
    assert info["text_encoding_matches_training"] is False and "DIFFERS" in caplog.text
    # --add-special-tokens forces BOS in front, like the 'mftcoder-bos' training template
    _, with_bos = PromptEncoder(str(tmp_path), tok, t, "training", True).encode("def add(a, b):\n")
    assert with_bos == [tok.bos_token_id] + ids


def test_generation_done_criteria():
    assert generation_done("```python\ndef f(): pass\n```", "mft")
    assert not generation_done("```python\ndef f(): pass\n", "mft")
    assert generation_done("    return 1\ndef g", "plain")
    assert not generation_done("    return 1\n    # comment", "plain")
    assert generation_done("anything<|role_start|>", "plain")


@pytest.mark.slow
def test_check_harness_scores_all_164_canonical_solutions(tmp_path):
    # The full set runs in about 5 s on 2 cores, so the unit test checks all of it.
    out = tmp_path / "check.json"
    p = cli("--check-harness", "--out", str(out), "--workers", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["summary"]["pass@1"] == 1.0 and rep["summary"]["n"] == 164
    assert rep["summary"]["mode"] == "check-harness"
    assert all(r["result"] == "passed" for r in rep["results"])


def test_postprocessed_chat_answers_of_canonical_solutions_pass():
    """A chat-style answer (whole function in a fenced block + chatter) survives post-processing."""
    problems = load_problems()[::3]  # execution of all 164 is covered by --check-harness
    programs = []
    for p in problems:
        raw = ("Here is the completed function:\n```python\n" + p["prompt"] + p["canonical_solution"]
               + "\n\nprint(" + p["entry_point"] + ")\n```\nIt works because...<|role_start|>human")
        programs.append(build_program(p, postprocess(raw, p["entry_point"])))
    res = run_many(programs, SandboxLimits(timeout_s=10.0), workers=2)
    assert [r.reason for r in res] == ["passed"] * len(problems)


def test_custom_problem_file_and_harness_failure_exit_code(tmp_path):
    f = tmp_path / "probs.jsonl"
    good = {"task_id": "t/0", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n",
            "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "inc"}
    bad = {**good, "task_id": "t/1", "canonical_solution": "    return x\n"}
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    out = tmp_path / "r.json"
    p = cli("--check-harness", "--problems", str(f), "--out", str(out))
    assert p.returncode == 1  # the harness self-test must not pass below 1.0
    rep = json.loads(out.read_text())
    assert rep["summary"]["pass@1"] == 0.5
    assert [r["result"] for r in rep["results"]] == ["passed", "failed: AssertionError"]
    assert "t/1: failed: AssertionError" in p.stderr

    f.write_text(json.dumps(good) + "\n{not json\n")
    p = cli("--check-harness", "--problems", str(f), "--out", str(out))
    assert p.returncode == 2 and f"{f}:2: invalid JSON" in p.stderr


def test_known_completions_give_an_exact_pass_at_1(tmp_path):
    """Eight problems whose 'solutions' pass or fail by construction: pass@1 = 5/8 exactly, and
    every outcome is the known one."""
    from megatron_mft.evaluate.humaneval import HumanEvalConfig, run_humaneval

    base = {"prompt": "def inc(x):\n", "test": "def check(c):\n    assert c(1) == 2\n    assert c(-3) == -2\n",
            "entry_point": "inc"}
    bodies = {"ok-add": "    return x + 1\n", "ok-sub": "    return x - (-1)\n", "ok-sum": "    return sum([x, 1])\n",
              "ok-helper": "    return _one() + x\ndef _one():\n    return 1\n", "ok-int": "    return int(x) + 1\n",
              "wrong-value": "    return x + 2\n", "one-case-right": "    return 2\n",
              "name-error": "    return y + 1\n"}
    f = tmp_path / "known.jsonl"
    f.write_text("".join(json.dumps({**base, "task_id": k, "canonical_solution": v}) + "\n" for k, v in bodies.items()))
    rep = run_humaneval(HumanEvalConfig(check_harness=True, problems=str(f), out=str(tmp_path / "r.json"),
                                        workers=2, sandbox=SandboxLimits(timeout_s=10.0)))
    s = rep["summary"]
    assert (s["pass@1"], s["passed"], s["n"]) == (0.625, 5, 8)
    assert {r["task_id"]: r["result"] for r in rep["results"]} == {
        **{k: "passed" for k in bodies if k.startswith("ok-")},
        "wrong-value": "failed: AssertionError", "one-case-right": "failed: AssertionError",
        "name-error": "failed: NameError: name 'y' is not defined"}
    assert s["outcomes"] == {"passed": 5, "failed": 3}


def test_missing_hf_dir_is_an_argument_error(tmp_path):
    p = cli("--hf-dir", str(tmp_path / "nope"), "--limit", "1")
    assert p.returncode == 2 and "--hf-dir" in p.stderr


def test_config_validation_names_every_bad_limit():
    """The config itself (not only the CLI) refuses a batch size or CPU limit below 1."""
    from megatron_mft.evaluate.generate import GenerationConfig
    from megatron_mft.evaluate.humaneval import HumanEvalConfig

    cfg = HumanEvalConfig(check_harness=True, generation=GenerationConfig(batch_size=0),
                          sandbox=SandboxLimits(cpu_s=0))
    problems = cfg.validate()
    assert any(p.startswith("--batch-size") for p in problems) and any(p.startswith("--cpu-s") for p in problems)


def _tiny_llama(path: Path) -> None:
    """A random 2-layer Llama and a byte-level BPE tokenizer trained on a few lines, saved like
    an exported model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = ["def add(a, b):\n    return a + b\n", "from typing import List\n\n",
            "<|role_start|>human<|role_end|>Complete the function.<|role_start|>bot<|role_end|>",
            "```python\nfor x in numbers:\n    if x > threshold:\n        return True\n```\n"] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.slow
def test_end_to_end_tiny_model_on_cpu(tmp_path):
    hf = tmp_path / "hf"
    _tiny_llama(hf)
    out = tmp_path / "res.json"
    p = cli("--hf-dir", str(hf), "--limit", "3", "--max-new-tokens", "8", "--out", str(out),
            "--device", "cpu", "--backend", "transformers", "--add-special-tokens")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    s = rep["summary"]
    assert s["n"] == 3 and len(rep["results"]) == 3
    # pass@1 is the share of problems whose recorded completion passes: re-run them independently
    rerun = run_many([build_program(p, r["completion"]) for p, r in zip(load_problems()[:3], rep["results"])],
                     SandboxLimits(timeout_s=10.0), workers=2)
    assert [r["passed"] for r in rep["results"]] == [x.passed for x in rerun]
    assert s["passed"] == sum(x.passed for x in rerun) and s["pass@1"] == s["passed"] / 3
    assert s["template"] == "mft" and s["add_special_tokens"] is True
    assert s["prompt_encoding"] == "training" and s["generation"]["chat_template"] == "mftcoder"
    assert s["template_string"] == "<|role_start|>human<|role_end|>{instruction}<|role_start|>bot<|role_end|>"
    assert s["first_prompt"].startswith("<|role_start|>human<|role_end|>Complete the following Python")
    assert s["first_prompt"].endswith("<|role_start|>bot<|role_end|>")
    assert s["generation"]["starts_with_bos"] is True and s["generation"]["max_new_tokens"] == 8
    assert s["model_dir"] == str(hf)
    for r, tid in zip(rep["results"], ["HumanEval/0", "HumanEval/1", "HumanEval/2"]):
        assert r["task_id"] == tid and isinstance(r["passed"], bool)
        assert r["result"] == "passed" or r["result"].startswith(("failed", "timed out", "memory limit"))
        assert "generation" in r and "completion" in r
    # the log states template, the exact first prompt and the special-token choice
    assert "template: mft" in p.stderr and "add_special_tokens: True" in p.stderr
    assert repr(s["first_prompt"]) in p.stderr


def test_problem_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    f = tmp_path / "probs.jsonl"
    good = {"task_id": "t/0", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n",
            "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "inc"}
    f.write_bytes((json.dumps(good) + "\n").encode() + b'{"task_id": "t/\xff"}\n')
    p = cli("--check-harness", "--problems", str(f), "--out", str(tmp_path / "r.json"))
    assert p.returncode == 2 and f"{f}:2: not UTF-8 text" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_backend_refusal_is_not_reported_as_a_bad_argument(tmp_path, monkeypatch, capsys):
    """vLLM refuses to start with a ValueError (KV cache smaller than the model's length): exit 1
    with vLLM's own advice, not exit 2 "invalid arguments" as if the problems file were at fault."""
    import types

    import megatron_mft.evaluate.__main__ as evaluate

    hf = tmp_path / "hf"
    _tiny_llama(hf)
    kv = ("The model's max seq len (2048) is larger than the maximum number of tokens that can be stored "
          "in KV cache (1024). Try increasing `gpu_memory_utilization` or decreasing `max_model_len`")
    vllm = types.ModuleType("vllm")

    def refuse(**kwargs):
        raise ValueError(kv)

    vllm.LLM, vllm.SamplingParams = refuse, dict
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    code = evaluate.main(["humaneval", "--hf-dir", str(hf), "--backend", "vllm", "--limit", "1",
                          "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 1 and f"--backend vllm: vLLM could not start {hf}: {kv}" in err, err
    assert "invalid arguments" not in err and "Traceback" not in err and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("encoding", ["training", "text"])
def test_role_markers_of_a_sentencepiece_vocabulary_count_as_one_piece(tmp_path, caplog, encoding):
    """The demo SentencePiece model has both markers as pieces; transformers encodes a marker alone
    as ['▁', '<|role_start|>'] (the dummy prefix), so the diagnostics reported 2 pieces for a
    dedicated token. Exported as ``convert mcore-to-hf`` writes a lone .model file."""
    from transformers import AutoTokenizer

    from megatron_mft.checkpoint.hf.export_tokenizer import _lone_sentencepiece, write_tokenizer
    from megatron_mft.evaluate.encoding import PromptEncoder
    from megatron_mft.evaluate.humaneval import _log_prompt_diagnostics

    sp = Path(__file__).resolve().parents[1] / "examples" / "demo_data" / "tokenizer" / "demo_sp2048.model"
    write_tokenizer(_lone_sentencepiece(sp, "test"), tmp_path, tmp_path, log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok("<|role_start|>", add_special_tokens=False)["input_ids"]) == 2  # what was counted
    enc = PromptEncoder(str(tmp_path), tok, PromptTemplate("mft", instruction="Complete:\n{prompt}"), encoding, None)
    text, ids = enc.encode("def add(a, b):\n")
    with caplog.at_level("INFO"):
        info = _log_prompt_diagnostics(enc, "t/0", text, ids)
    assert info["role_marker_pieces"] == {"<|role_start|>": 1, "<|role_end|>": 1}, info
    assert "role markers tokenize to {'<|role_start|>': 1, '<|role_end|>': 1} pieces" in caplog.text
    if encoding == "training":  # a family template's markers are its own specials (a KeyError at first)
        qwen = PromptEncoder(str(tmp_path), tok, PromptTemplate("mft"), encoding, None, chat_template="qwen2")
        info = _log_prompt_diagnostics(qwen, "t/0", *qwen.encode("def add(a, b):\n"))
        assert set(info["role_marker_pieces"]) == set(qwen.formatter.marker_ids) >= {"<|im_start|>", "<|im_end|>"}
        assert all(n > 1 for n in info["role_marker_pieces"].values()), info  # not in the demo vocabulary
