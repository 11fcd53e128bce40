"""The files that travel with the weights: the base's tokenizer, chat template, generation and
processor configs overlaid with the adapter's, and the merged tokenizer checked by loading it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bot import errors
from bot.cli import main
from bot.sources import files_to_download
from factory import VOCAB, assert_matches_peft, build_adapter, build_base

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_end|>", "user", "assistant", ":"] + [f"w{i}" for i in range(40)]
ADAPTER_TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} <|im_end|> {% endfor %}"
BASE_TEMPLATE = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"


def save_fast_tokenizer(folder: Path, words: list[str]) -> None:
    """A tiny WordLevel fast tokenizer, built offline with `tokenizers`, saved as transformers does."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


@pytest.fixture()
def inputs(cache_dir, tmp_path):
    """A base with a fast tokenizer (and generation_config.json), and a LoRA adapter with no tokenizer files."""
    built = build_base(cache_dir, "llama")
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(built, base)
    save_fast_tokenizer(base, WORDS)
    shutil.copytree(build_adapter(cache_dir, "side-files-lora", built, "llama",
                                  LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), adapter)
    return base, adapter


def merge(base: Path, adapter: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["merge", str(adapter), "--base", str(base), "--out", str(out), "--quiet"])
    return code, capsys.readouterr().err


def test_adapter_with_only_a_chat_template_keeps_the_base_tokenizer(inputs, tmp_path, capsys):
    base, adapter = inputs
    (base / "chat_template.jinja").write_text(BASE_TEMPLATE)  # the adapter's template must win over this
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": ADAPTER_TEMPLATE}))
    out = tmp_path / "merged"
    code, err = merge(base, adapter, out, capsys)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert not (out / "chat_template.jinja").exists()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ADAPTER_TEMPLATE and config["eos_token"] == "</s>"  # base keys kept

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(WORDS) and tokenizer.eos_token_id == 2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "w3 w4"}], tokenize=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "user", ":", "w3", "w4", "<|im_end|>"]
    assert_matches_peft(out, base, adapter)


def test_adapter_moving_eos_aligns_generation_config(inputs, tmp_path, capsys):
    base, adapter = inputs
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 2
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": ADAPTER_TEMPLATE,
                                                               "eos_token": "<|im_end|>"}))
    out = tmp_path / "merged"
    code, err = merge(base, adapter, out, capsys)
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(out).eos_token_id == 4
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 4
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 2  # the input is untouched
    report = json.loads((out / "merge_report.json").read_text())
    assert any("generation_config.json eos_token_id set to 4 (was 2)" in w for w in report["warnings"])
    assert any("config.json says 2" in w for w in report["warnings"])  # reported, not rewritten
    assert "warning: generation_config.json eos_token_id set to 4" in err


def test_adapter_generation_config_wins_key_by_key(inputs, tmp_path, capsys):
    base, adapter = inputs
    (adapter / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "do_sample": True}))
    (adapter / "preprocessor_config.json").write_text(json.dumps({"size": 8}))
    out = tmp_path / "merged"
    code, err = merge(base, adapter, out, capsys)
    assert code == 0, err
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["temperature"] == 0.3 and generation["eos_token_id"] == 2
    assert json.loads((out / "preprocessor_config.json").read_text()) == {"size": 8}


def test_tokenizer_that_does_not_load_is_refused(inputs, tmp_path, capsys):
    base, adapter = inputs
    # Remote code is never run, so a tokenizer that needs it does not load.
    (adapter / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ChatTok", "auto_map": {"AutoTokenizer": ["tok.ChatTok", None]}}))
    out = tmp_path / "merged"
    code, err = merge(base, adapter, out, capsys)
    lines = err.strip().splitlines()
    assert code == errors.AdapterConfigError.exit_code, err
    assert lines[-1].startswith("Error: the merged tokenizer") and "does not load with AutoTokenizer" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_adapter_tokenizer_larger_than_the_embeddings_is_refused(inputs, tmp_path, capsys):
    base, adapter = inputs
    save_fast_tokenizer(adapter, WORDS + [f"new{i}" for i in range(VOCAB)])  # added tokens, embeddings not resized
    out = tmp_path / "merged"
    code, err = merge(base, adapter, out, capsys)
    assert code == errors.AdapterConfigError.exit_code, err
    assert f"{len(WORDS) + VOCAB} tokens but the model has {VOCAB} embedding rows" in err
    assert not out.exists()


def test_adapter_with_a_whole_tokenizer_replaces_the_base_vocabulary(inputs, tmp_path, capsys):
    base, adapter = inputs
    (base / "vocab.txt").write_text("\n".join(WORDS))  # a stale extra vocabulary file of the base
    save_fast_tokenizer(adapter, list(reversed(WORDS)))
    out = tmp_path / "merged"
    code, err = merge(base, adapter, out, capsys)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()
    assert not (out / "vocab.txt").exists()  # two vocabularies are never mixed
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<unk>") == len(WORDS) - 1


def test_hub_download_picks_every_side_file():
    files = ["adapter_config.json", "adapter_model.safetensors", "generation_config.json", "processor_config.json",
             "preprocessor_config.json", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json",
             "tokenizer_config.json", "train.py", "optimizer.pt", "checkpoint-10/tokenizer.json"]
    wanted = files_to_download(files, "adapter", lambda name: {})
    assert set(wanted) == set(files) - {"train.py", "optimizer.pt", "checkpoint-10/tokenizer.json"}
    base = files_to_download(["config.json", "model.safetensors", "processor_config.json",
                              "preprocessor_config.json", "generation_config.json", "chat_template.jinja"],
                             "base", lambda name: {})
    assert set(base) == {"config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
                         "generation_config.json", "chat_template.jinja"}


def test_local_paths_recorded_by_old_transformers_are_not_carried(inputs, tmp_path, capsys):
    base, adapter = inputs
    home_path = str(Path.home() / "models" / "my-base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": home_path}))
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "name_or_path": home_path}))
    (base / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "name_or_path": "org/base"}))
    out = tmp_path / "merged"
    code, err = merge(base, adapter, out, capsys)
    assert code == 0, err
    for name in ("config.json", "tokenizer_config.json", "merge_report.json", "README.md"):
        assert home_path not in (out / name).read_text(), name
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    # A file with nothing to change is copied byte for byte (a Hub id is not a local path).
    assert (out / "special_tokens_map.json").read_bytes() == (base / "special_tokens_map.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out).eos_token_id == 2
