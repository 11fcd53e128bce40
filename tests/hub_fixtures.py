"""Tiny bases and adapters published on the test Hub, shared by the publish, Space and bot tests."""
from __future__ import annotations

import json
import re
from pathlib import Path

from peft import LoraConfig

from factory import build_adapter, build_base
from hub_server import user_id

ALICE = "hf_aliceTESTtoken0000000000000000000001"
BOB = "hf_bobTESTtoken00000000000000000000000002"
CAROL = "hf_carolTESTtoken000000000000000000000003"
BASE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\ndatasets:\n- bob/pretraining\n---\n# tiny llama\n"
ADAPTER_CARD = "---\nlicense: mit\ndatasets:\n- alice/chat-data\nlibrary_name: peft\n---\n# tiny lora\n"


def folder_files(folder: Path, **extra: bytes) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files.update(extra)
    return files


def adapter_files(folder: Path, base_id: str, card: str = ADAPTER_CARD) -> dict[str, bytes]:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_id
    return folder_files(folder, **{"adapter_config.json": json.dumps(config).encode(), "README.md": card.encode()})


def quantized_files(base: Path, card: str | None) -> dict[str, bytes]:
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    files = {"config.json": json.dumps(config).encode(), "model.safetensors": b"not really 4-bit weights"}
    if card:
        files["README.md"] = card.encode()
    return files


def publish_models(hub, cache_dir: Path) -> dict:
    """Bases and adapters on the test Hub, plus their local copies for reference outputs."""
    hub.add_user("alice", ALICE, orgs=("lab",))
    hub.add_user("bob", BOB)
    hub.add_user("carol", CAROL)
    base = build_base(cache_dir, "llama")
    adapter = build_adapter(cache_dir, "publish-lora", base, "llama", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hub.create_repo("bob/tiny-llama", owner_token=BOB, files=folder_files(base, **{"README.md": BASE_CARD.encode()}))
    hub.create_repo("alice/tiny-lora", owner_token=ALICE, files=adapter_files(adapter, "bob/tiny-llama"))
    hub.create_repo("bob/gated-llama", owner_token=BOB, gated="manual", files=folder_files(base))
    hub.create_repo("alice/lora-on-gated", owner_token=ALICE, files=adapter_files(adapter, "bob/gated-llama"))
    card = "---\nbase_model: bob/tiny-llama\nbase_model_relation: quantized\n---\n"
    hub.create_repo("bob/tiny-llama-bnb-4bit", owner_token=BOB, files=quantized_files(base, card))
    hub.create_repo("alice/qlora", owner_token=ALICE, files=adapter_files(adapter, "bob/tiny-llama-bnb-4bit"))
    hub.create_repo("bob/bare-bnb-4bit", owner_token=BOB, files=quantized_files(base, None))
    hub.create_repo("alice/qlora-bare", owner_token=ALICE, files=adapter_files(adapter, "bob/bare-bnb-4bit"))
    prompt = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8,
              "base_model_name_or_path": "bob/tiny-llama"}
    hub.create_repo("alice/prompt-tuning", owner_token=ALICE,
                    files={"adapter_config.json": json.dumps(prompt).encode()})
    return {"base": base, "adapter": adapter}


def webhook_payload(hub, num: int, comment_id: str, who: str, text: str, *, scope: str = "discussion.comment",
                    repo: str) -> dict:
    """What the Hub POSTs to a webhook for a new discussion (scope "discussion") or comment in ``repo``."""
    web = f"{hub.url}/{repo}/discussions/{num}"
    return {
        "event": {"action": "create", "scope": scope},
        "repo": {"type": "model", "name": repo, "id": "65f0c0ffee0000000000abcd", "private": False,
                 "owner": {"id": user_id(repo.split("/")[0])}, "headSha": "0" * 40,
                 "url": {"web": f"{hub.url}/{repo}", "api": f"{hub.url}/api/models/{repo}"}},
        "discussion": {"id": f"disc{num:020d}", "num": num, "author": {"id": user_id(who)}, "title": "merge request",
                       "isPullRequest": False, "status": "open", "url": {"web": web, "api": web}},
        "comment": {"id": comment_id, "author": {"id": user_id(who)}, "hidden": False, "content": text,
                    "url": {"web": f"{web}#{comment_id}"}},
        "webhook": {"id": "6600000000000000000000ab", "version": 3},
    }


def push_payload(hub, repo: str, head: str, ref: str = "refs/heads/main", old: str | None = "0" * 40) -> dict:
    """What the Hub POSTs to a webhook when ``ref`` of ``repo`` moves to ``head`` (scope "repo.content")."""
    body = webhook_payload(hub, 0, "0" * 24, repo.split("/")[0], "", repo=repo)
    body.update({"event": {"action": "update", "scope": "repo.content"}, "discussion": None, "comment": None,
                 "updatedRefs": [{"ref": ref, "oldSha": old, "newSha": head}]})
    body["repo"]["headSha"] = head
    return body


def publish_sharded_llama(hub, cache_dir: Path, name: str, *, seed: int, layers: int, targets: list[str]) -> dict:
    """A small untied Llama saved in several ~200 KB shards as ``bob/{name}-llama`` and a LoRA on
    ``targets`` as ``alice/{name}-lora``: the streamed pipeline's many pieces and shards in miniature."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from factory import VOCAB

    base = cache_dir / f"base-{name}-llama"
    if not (base / "config.json").exists():
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             architectures=["LlamaForCausalLM"])
        LlamaForCausalLM(config).save_pretrained(base, max_shard_size="200KB")
    adapter = build_adapter(cache_dir, f"{name}-lora", base, "llama_untied", LoraConfig(r=4, target_modules=targets))
    hub.create_repo(f"bob/{name}-llama", owner_token=BOB, files=folder_files(base))
    hub.create_repo(f"alice/{name}-lora", owner_token=ALICE, files=adapter_files(adapter, f"bob/{name}-llama"))
    return {"base": base, "adapter": adapter,
            "weights": sum(p.stat().st_size for p in base.glob("*.safetensors"))}


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    """Every tensor of a folder's safetensors files, by name, as its raw bytes (bit-for-bit comparisons)."""
    import torch
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes()
    return out


_TEST_TOKEN = re.compile(r"hf_\w*TEST\w*")  # every token the tests hand out has TEST in it


def run_cli(capsys, *argv: str, token: str | None = ALICE) -> tuple[int, str, str]:
    """``python -m bot`` in process with ``token``: (exit code, stdout, stderr); no token and no
    traceback may appear in either."""
    from bot import cli

    code = cli.main([*argv, *(["--token", token] if token else [])])
    out, err = capsys.readouterr()
    assert not _TEST_TOKEN.search(out) and not _TEST_TOKEN.search(err), "a token was printed"
    assert "Traceback" not in err
    return code, out, err


def error_line(err: str) -> str:
    """The one ``Error:`` line a failure prints, last (progress lines may precede it)."""
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def our_commits(hub, repo_id: str, revision: str = "main") -> list[dict]:
    """The commits merge-bot made on ``revision`` (their titles start with "Merge ")."""
    return [c for c in hub.commits(repo_id, revision) if c["title"].startswith("Merge ")]
