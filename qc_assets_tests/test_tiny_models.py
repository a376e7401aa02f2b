"""`qc models tiny`: real architectures, built offline, loadable by transformers and sentence-transformers."""

from __future__ import annotations

import json

import pytest
from sentence_transformers import CrossEncoder
from transformers import AutoModelForCausalLM, AutoTokenizer

from qc_assets.models.tiny import CROSS_ENCODER_DIR, STUDENT_DIR, TINY_MARKER, ensure_tiny_models, is_tiny
from qc_assets.settings import SAMPLE_CORPUS
from qc_assets_tests.conftest import run_qc


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    texts = [
        json.loads(line)["text"]
        for path in sorted(SAMPLE_CORPUS.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    return ensure_tiny_models(tmp_path_factory.mktemp("models"), texts), texts


def test_the_tiny_student_is_a_qwen3_whose_template_marks_only_the_answer_and_that_generates(tiny_models):
    built, texts = tiny_models
    directory = built[STUDENT_DIR]
    assert is_tiny(directory) and json.loads((directory / TINY_MARKER).read_text())["architecture"] == "Qwen3ForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    # The tokenizer was trained on Japanese text: a sample sentence takes far fewer tokens than its UTF-8 bytes.
    assert len(tokenizer(texts[0])["input_ids"]) < len(texts[0].encode("utf-8")) / 2
    conversation = [
        {"role": "system", "content": "title"},
        {"role": "user", "content": texts[0]},
        {"role": "assistant", "content": "日本の四季"},
    ]
    encoded = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [token for token, keep in zip(encoded["input_ids"], encoded["assistant_masks"]) if keep]
    assert tokenizer.decode(answer) == "日本の四季<|im_end|>"
    prompt = tokenizer.apply_chat_template(conversation[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_the_tiny_cross_encoder_is_an_xlm_roberta_with_one_label_scoring_in_0_1(tiny_models):
    built, texts = tiny_models
    scorer = CrossEncoder(str(built[CROSS_ENCODER_DIR]))
    assert type(scorer.model).__name__ == "XLMRobertaForSequenceClassification"
    scores = scorer.predict([("日本の四季とは?", texts[0]), ("別の質問", texts[1])])
    assert scores.shape == (2,) and all(0.0 < score < 1.0 for score in scores)


def test_qc_models_tiny_builds_once_and_skips_when_present(tmp_path):
    env = {"QC_DATA_DIR": str(tmp_path / "data")}
    first = run_qc(["models", "tiny"], env)
    assert first.returncode == 0, first.stderr
    marker = tmp_path / "data" / "models" / STUDENT_DIR / TINY_MARKER
    built_at = marker.stat().st_mtime_ns
    assert run_qc(["models", "tiny"], env).returncode == 0
    assert marker.stat().st_mtime_ns == built_at
    assert not list((tmp_path / "data" / "models").glob(".*.partial"))
