"""Publishing end to end: the real huggingface_hub client against the loopback test Hub.

Every test drives ``python -m bot ...`` through ``bot.cli.main`` (one through a child
process) and then inspects the server's state: commits, files, pull requests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, snapshot_download
from bot import transport as bot_transport
from factory import assert_matches_peft, unverified_report
from hub_fixtures import ALICE, BOB, CAROL, adapter_files, error_line, our_commits, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_run_publishes_new_repo_in_one_commit_with_peft_equal_logits(hub, models, capsys, tmp_path):
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/tiny-merged", "--verify")
    assert code == 0, err
    assert "published alice/tiny-merged in one commit" in out
    assert len(our_commits(hub, "alice/tiny-merged")) == 1
    files = hub.files("alice/tiny-merged")
    assert {"config.json", "model.safetensors", "README.md", "merge_report.json"} <= set(files)
    assert not any("adapter" in name for name in files)
    report = json.loads(files["merge_report.json"])
    assert report["adapter"]["repo_id"] == "alice/tiny-lora"
    assert report["adapter"]["revision"] == hub.commits("alice/tiny-lora")[0]["id"]
    assert report["base"]["revision"] == hub.commits("bob/tiny-llama")[0]["id"]

    local = snapshot_download("alice/tiny-merged", cache_dir=tmp_path / "dl")
    assert_matches_peft(Path(local), models["base"], models["adapter"])

    # The same job again: found by its fingerprint before any merge, no new commit.
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/tiny-merged", "--verify")
    assert code == 0, err
    assert "already holds this exact merge; nothing to do" in out
    assert len(our_commits(hub, "alice/tiny-merged")) == 1


def test_model_card_metadata_and_body(hub, models, capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "lab/card-check", "--dtype", "bfloat16")
    assert code == 0, err
    card_path = tmp_path / "README.md"
    card_path.write_bytes(hub.files("lab/card-check")["README.md"])
    card = ModelCard.load(card_path)
    data = card.data.to_dict()
    assert data["base_model"] == "bob/tiny-llama"
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    # The adapter's card says mit, the base's apache-2.0: the merged weights are mostly the base's.
    assert data["license"] == "apache-2.0"
    assert "`apache-2.0`" in card.text and "`mit`" in card.text and "they differ" in card.text
    assert data["datasets"] == ["alice/chat-data"]
    assert data["language"] == ["en"]  # the adapter says nothing, so the base's
    assert {"merge", "lora", "peft-merge"} <= set(data["tags"])
    adapter_sha = hub.commits("alice/tiny-lora")[0]["id"]
    assert f"alice/tiny-lora/tree/{adapter_sha}" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text and 'repo = "lab/card-check"' in card.text
    report = json.loads(hub.files("lab/card-check")["merge_report.json"])
    assert data["merge_bot"]["fingerprint"] == report["fingerprint"]
    assert report["output_dtype"] == "bfloat16"


def test_pr_mode_opens_one_pr_and_leaves_main_untouched(hub, models, capsys):
    hub.create_repo("bob/shared-model", owner_token=BOB, files={"README.md": b"# bob's model\n", "notes.txt": b"x"})
    main_before = hub.commits("bob/shared-model")
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/shared-model", "--pr")
    assert code == 0, err
    assert "opened pull request on bob/shared-model" in out
    prs = [d for d in hub.discussions("bob/shared-model") if d["is_pull_request"]]
    assert len(prs) == 1 and prs[0]["status"] == "open"
    assert prs[0]["title"].startswith("Merge LORA adapter alice/tiny-lora@")
    assert hub.commits("bob/shared-model") == main_before
    assert "model.safetensors" in hub.files("bob/shared-model", prs[0]["git_reference"])
    assert "model.safetensors" not in hub.files("bob/shared-model")

    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/shared-model", "--pr")
    assert code == 0, err
    assert "already proposes this exact merge" in out and f"/discussions/{prs[0]['num']}" in out
    assert len([d for d in hub.discussions("bob/shared-model") if d["is_pull_request"]]) == 1


def test_pr_on_missing_repo_is_a_clear_error(hub, models, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/not-there", "--pr")
    assert code == 3 and "does not exist" in err and "drop --pr" in err


def test_existing_repo_without_pr_is_refused(hub, models, capsys):
    hub.create_repo("alice/occupied", owner_token=ALICE, files={"weights.txt": b"something else"})
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/occupied")
    assert code == 12 and "--pr" in err
    assert set(hub.files("alice/occupied")) - {".gitattributes"} == {"weights.txt"}


def test_gated_base_without_access_creates_nothing(hub, models, capsys):
    code, _, err = run_cli(capsys, "run", "alice/lora-on-gated", "--repo", "alice/gated-merged")
    assert code == 4
    assert "bob/gated-llama is gated" in err and "request access" in err
    assert "is gated" in error_line(err)
    assert not hub.repo_exists("alice/gated-merged")
    hub.grant("bob/gated-llama", "alice")
    code, _, err = run_cli(capsys, "run", "alice/lora-on-gated", "--repo", "alice/gated-merged")
    assert code == 0, err
    # The base is now in the shared cache; carol still has no access and must not get it from there.
    code, _, err = run_cli(capsys, "run", "alice/lora-on-gated", "--repo", "carol/gated-merged", token=CAROL)
    assert code == 4 and "bob/gated-llama is gated" in error_line(err)
    assert not hub.repo_exists("carol/gated-merged")


@pytest.mark.parametrize("adapter, message", [
    ("alice/no-such-adapter", "adapter repo alice/no-such-adapter not found"),
    ("alice/tiny-lora@v9.9", "adapter revision 'v9.9' does not exist in alice/tiny-lora"),
    ("alice/prompt-tuning", "PROMPT_TUNING"),
])
def test_bad_adapters_fail_before_anything_is_created(hub, models, capsys, adapter, message):
    target = "alice/bad-" + adapter.split("/")[1].replace("@", "-").replace(".", "-")
    code, _, err = run_cli(capsys, "run", adapter, "--repo", target)
    assert code in (3, 6), err
    assert message in err
    assert not hub.repo_exists(target)


def test_foreign_namespace_and_bad_token(hub, models, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/for-bob")
    assert code == 4 and "cannot write to namespace bob" in err
    assert not hub.repo_exists("bob/for-bob")
    bad = "hf_notARealToken0000000000000000000000"
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/x", token=bad)
    assert code == 11 and "rejected the token" in err and bad not in err


def test_server_403_on_commit_is_one_line(hub, models, capsys, monkeypatch):
    # carol's pre-check passes (her namespace), the Hub still refuses the commit.
    hub.fail_next("POST", r"/api/models/carol/refused/commit/", status=403)
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "carol/refused", token=CAROL)
    assert code == 4 and "HTTP 403" in error_line(err) and "may not write to carol/refused" in err
    assert not our_commits(hub, "carol/refused")


def test_500_on_first_commit_is_retried(hub, models, capsys, monkeypatch, caplog):
    monkeypatch.setattr(bot_transport, "WRITE_RETRY_WAITS", (0.01, 0.01, 0.01))
    hub.fail_next("POST", r"/api/models/alice/retried/commit/", status=500, times=1)
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/retried")
    assert code == 0, err
    assert "transient Hub error while publishing to alice/retried (500); retrying" in caplog.text
    assert len(our_commits(hub, "alice/retried")) == 1


def test_failing_upload_leaves_no_commit_and_a_rerun_finishes(hub, models, capsys, monkeypatch):
    monkeypatch.setattr(bot_transport, "WRITE_RETRY_WAITS", (0.01,))
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # the client's own LFS retries
    hub.fail_next("PUT", r".*", status=500, times=1000)
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/half-done")
    hub.reset_faults()
    assert code == 9 and "nothing was committed" in err
    assert not our_commits(hub, "alice/half-done")
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/half-done")
    assert code == 0, err
    assert len(our_commits(hub, "alice/half-done")) == 1


def test_qlora_adapter_is_merged_into_the_16_bit_original(hub, models, capsys):
    code, out, err = run_cli(capsys, "run", "alice/qlora", "--repo", "alice/qlora-merged")
    assert code == 0, err
    assert "quantized" in err and "bob/tiny-llama" in err
    report = json.loads(hub.files("alice/qlora-merged")["merge_report.json"])
    assert report["base"]["repo_id"] == "bob/tiny-llama"
    assert "bob/tiny-llama-bnb-4bit" in report["base_note"]
    assert "bob/tiny-llama-bnb-4bit" in hub.files("alice/qlora-merged")["README.md"].decode()


def test_quantized_base_with_no_original_is_refused_with_advice(hub, models, capsys):
    code, _, err = run_cli(capsys, "run", "alice/qlora-bare", "--repo", "alice/qlora-bare-merged")
    assert code == 7 and "--base" in err and "quantized" in err
    assert not hub.repo_exists("alice/qlora-bare-merged")
    code, _, err = run_cli(capsys, "run", "alice/qlora-bare", "--repo", "alice/qlora-bare-merged",
                           "--base", "bob/tiny-llama")
    assert code == 0, err


def test_private_repo_is_private(hub, models, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/secret-merge", "--private")
    assert code == 0, err
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    assert HfApi(token=ALICE).model_info("alice/secret-merge").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=BOB).model_info("alice/secret-merge")


def test_merge_then_push_then_push_again(hub, models, capsys, tmp_path):
    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", "alice/tiny-lora", "--out", str(out), "--quiet")
    assert code == 0, err
    code, out_text, err = run_cli(capsys, "push", str(out), "--repo", "alice/pushed")
    assert code == 0, err
    assert "published alice/pushed" in out_text
    code, out_text, err = run_cli(capsys, "push", str(out), "--repo", "alice/pushed")
    assert code == 0 and "nothing to do" in out_text
    assert len(our_commits(hub, "alice/pushed")) == 1
    code, _, err = run_cli(capsys, "push", str(models["adapter"]), "--repo", "alice/not-a-merge")
    assert code == 2 and "merge_report.json" in err


def test_push_of_a_local_merge_publishes_no_local_path(hub, models, capsys, tmp_path, monkeypatch):
    """As users hit it: folders under their home, merged and pushed; nothing published may name them."""
    home = tmp_path / "home" / "someone"
    adapter, base = home / "work" / "my-adapter", home / "work" / "my-base"
    base.mkdir(parents=True)
    for f in models["base"].iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["_name_or_path"] = "bob/tiny-llama"  # what transformers 4 wrote when saving a model loaded from the Hub
    (base / "config.json").write_text(json.dumps(config))
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# my base\n")
    adapter.mkdir()
    for f in models["adapter"].iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    (adapter / "README.md").write_text("---\nlicense: mit\n---\n# my adapter\n")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    out = home / "work" / "merged"
    code, _, err = run_cli(capsys, "merge", str(adapter), "--out", str(out), "--quiet", "--verify")
    assert code == 0, err
    code, _, err = run_cli(capsys, "push", str(out), "--repo", "alice/from-local")
    assert code == 0, err

    published = {name: data.decode() for name, data in hub.files("alice/from-local").items()
                 if name.endswith((".json", ".md", ".txt", ".jinja"))}
    commit = hub.commits("alice/from-local")[0]
    published["commit"] = f"{commit['title']}\n{commit['message']}"
    assert {"merge_report.json", "README.md", "config.json"} <= set(published)
    for text in published.values():
        for local in (str(tmp_path), str(home), "/home/", "someone", "my-adapter", "my-base"):
            assert local not in text
    report = json.loads(published["merge_report.json"])
    assert report["adapter"]["ref"] == "a local folder" and report["adapter"]["revision"].startswith("local-")
    assert report["base"]["config_names"] == "bob/tiny-llama"
    assert "Merge LORA adapter a local folder into a local folder" in published["commit"]

    card_path = tmp_path / "README.md"
    card_path.write_text(published["README.md"])
    card = ModelCard.load(card_path)
    data = card.data.to_dict()
    assert data["base_model"] == "bob/tiny-llama"  # named by the folder's config.json, and the card says so
    assert "whose config.json names [bob/tiny-llama]" in card.text
    assert data["license"] == "apache-2.0" and "`mit`" in card.text and "they differ" in card.text
    local = snapshot_download("alice/from-local", cache_dir=tmp_path / "dl")
    assert_matches_peft(Path(local), models["base"], models["adapter"])


def test_a_local_base_naming_no_hub_repo_has_no_base_model(models, tmp_path):
    from bot.card import build_card
    from bot.report import ReportSource

    report = unverified_report(adapter=ReportSource(ref="a local folder", repo_id=None, revision="local-0123"),
                               base=ReportSource(ref="a local folder", repo_id=None, revision="local-4567"))
    card = build_card(report, None, None, hub_url="http://hub.test")
    assert "base_model:" not in card and "names no Hub repo, so this card has no `base_model`" in card
    assert "Neither the base model's card nor the adapter's declares a license" in card


def test_a_verify_run_adds_verification_to_a_plain_publish_once(hub, models, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/verified-later", "--no-verify")
    assert code == 0, err
    assert json.loads(hub.files("alice/verified-later")["merge_report.json"])["verification"] is None
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/verified-later", "--verify")
    assert code == 0, err
    assert "nothing to do" not in out
    commits = our_commits(hub, "alice/verified-later")
    assert len(commits) == 2
    files = hub.files("alice/verified-later")
    assert json.loads(files["merge_report.json"])["verification"]["end_to_end"]["max_abs_logit_delta"] < 1e-4
    assert b"**Per-module proof**" in files["README.md"] and b"**Passed.**" in files["README.md"]
    for flags in (["--verify"], []):  # verified now: neither kind of run has anything left to do
        code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/verified-later", *flags)
        assert code == 0 and "nothing to do" in out, err
    assert len(our_commits(hub, "alice/verified-later")) == 2


def test_a_verify_run_still_refuses_a_repo_holding_another_merge(hub, models, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/other-merge", "--dtype", "float16")
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/other-merge", "--verify")
    assert code == 12 and "already exists and holds other files" in error_line(err)
    assert len(our_commits(hub, "alice/other-merge")) == 1


def test_batch_runs_past_a_bad_job_and_reports_it(hub, models, capsys, tmp_path):
    batch = tmp_path / "jobs.yaml"
    batch.write_text(yaml.safe_dump({"jobs": [
        {"adapter": "alice/tiny-lora", "repo": "alice/batch-one"},
        {"adapter": "alice/missing-adapter", "repo": "alice/batch-two"},
        {"adapter": "alice/tiny-lora", "repo": "alice/batch-three", "dtype": "float16"},
    ]}))
    code, out, err = run_cli(capsys, "batch", str(batch))
    assert code == 1
    assert "1 of 3 jobs failed" in err
    lines = out.splitlines()
    assert "created" in lines[1] and "failed (exit 3)" in lines[2] and "created" in lines[3]
    assert hub.repo_exists("alice/batch-one") and hub.repo_exists("alice/batch-three")
    assert not hub.repo_exists("alice/batch-two")


@pytest.mark.parametrize("content, message", [
    ("jobs:\n  - adapter: a/b\n", "job 1: repo is required"),
    ("jobs:\n  - {adapter: a/b, repo: c/d}\n  - {adapter: a/b, repo: c/d, dtype: int3}\n", "job 2: unsupported dtype"),
    ("jobs:\n  - {adapter: a/b, repo: c/d, colour: red}\n", "unknown key(s) colour"),
    ("jobs: [\n", "not valid YAML"),
    ("jobs:\n  - {adapter: a/b, repo: c/d, pr: maybe}\n", "pr must be true or false"),
])
def test_batch_file_is_validated_before_any_job(hub, models, capsys, tmp_path, content, message):
    batch = tmp_path / "jobs.yaml"
    batch.write_text(content)
    code, _, err = run_cli(capsys, "batch", str(batch))
    assert code == 2 and message in err


def test_python_m_bot_run_in_a_child_process(hub, models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": ALICE}
    proc = subprocess.run([sys.executable, "-m", "bot", "run", "alice/tiny-lora", "--repo", "alice/from-child"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "published alice/from-child" in proc.stdout
    assert ALICE not in proc.stdout + proc.stderr
    assert len(our_commits(hub, "alice/from-child")) == 1


def test_pr_replacing_a_model_deletes_its_stale_loadable_files(hub, models, capsys, tmp_path):
    stale = {"model-00001-of-00002.safetensors": b"old shard", "model.safetensors.index.json": b"{}",
             "adapter_config.json": b"{}", "pytorch_model.bin": b"old", "tokenizer.model": b"old",
             "notes.txt": b"keep me", "README.md": b"# old card\n"}
    hub.create_repo("bob/old-model", owner_token=BOB, files=stale)
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/old-model", "--pr")
    assert code == 0, err
    pr = [d for d in hub.discussions("bob/old-model") if d["is_pull_request"]][0]
    head = hub.files("bob/old-model", pr["git_reference"])
    assert not {"model-00001-of-00002.safetensors", "model.safetensors.index.json", "adapter_config.json",
                "pytorch_model.bin", "tokenizer.model"} & set(head)
    assert head["notes.txt"] == b"keep me" and "model.safetensors" in head
    assert hub.files("bob/old-model") .keys() >= stale.keys()  # main untouched
    local = snapshot_download("bob/old-model", revision=pr["git_reference"], cache_dir=tmp_path / "dl")
    assert_matches_peft(Path(local), models["base"], models["adapter"])


@pytest.mark.parametrize("server_filters_authors", [True, False])
def test_someone_elses_pr_with_our_marker_is_not_reused(hub, models, capsys, server_filters_authors):
    from huggingface_hub import CommitOperationAdd, HfApi

    from bot.jobs import PublishJob
    from bot.preflight import preflight
    from bot.provenance import marker_line

    victim = "alice/victim" if server_filters_authors else "alice/victim-no-author-filter"
    hub.create_repo(victim, owner_token=ALICE, files={"README.md": b"# mine\n"})
    job = PublishJob(adapter="alice/tiny-lora", repo=victim, pr=True)
    spec = job.merge_spec(Path("unused"), ALICE)
    fp = preflight(spec, check_disk=False).fingerprint(spec)
    HfApi(token=BOB).create_commit(victim, [CommitOperationAdd("evil.txt", b"x")],
                                   commit_message="Merge LORA adapter (lookalike)",
                                   commit_description=f"evil\n\n{marker_line(fp)}", create_pr=True)
    if not server_filters_authors:
        hub.variant.add("ignore_author_filter")
    try:
        code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", victim, "--pr")
    finally:
        hub.variant.discard("ignore_author_filter")
    assert code == 0, err
    assert "opened pull request" in out
    assert len([d for d in hub.discussions(victim) if d["is_pull_request"]]) == 2


def test_private_cannot_be_honoured_on_an_existing_public_repo(hub, models, capsys):
    hub.create_repo("alice/empty-public", owner_token=ALICE, files={".gitattributes": b"*.bin filter=lfs\n"})
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/empty-public", "--private")
    assert code == 12 and "is public" in error_line(err)
    assert not our_commits(hub, "alice/empty-public")


def test_read_only_token_is_refused_before_any_download(hub, models, capsys):
    reader = "hf_readerTESTtoken00000000000000000000004"
    hub.add_user("reader", reader, role="read")
    before = len(hub.requests_log)
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "reader/x", token=reader)
    assert code == 11 and "read-only" in error_line(err)
    assert not [r for r in hub.requests_log[before:] if "/resolve/" in r[1]]


def test_refusals_about_the_target_come_before_the_merge(hub, models, capsys):
    before = len(hub.requests_log)
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/nowhere", "--pr")
    assert code == 3
    assert not [r for r in hub.requests_log[before:] if r[1].endswith("model.safetensors")]


def test_hub_adapter_cannot_name_a_local_base(hub, models, capsys):
    files = adapter_files(models["adapter"], str(models["base"]))
    hub.create_repo("bob/sneaky-lora", owner_token=BOB, files=files)
    code, _, err = run_cli(capsys, "run", "bob/sneaky-lora", "--repo", "alice/sneaky-merged")
    assert code == 2 and "local path" in error_line(err)
    assert not hub.repo_exists("alice/sneaky-merged")


@pytest.mark.parametrize("repo", ["alice/model-", "alice/a--b", "alice/x.git"])
def test_repo_ids_the_hub_rejects_are_usage_errors(hub, models, capsys, repo):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", repo)
    assert code == 2 and "owner/name" in error_line(err)


def test_malformed_card_metadata_is_not_inherited(hub, models, capsys, tmp_path):
    card = "---\nlicense: [mit, {x: 1}]\nlanguage: 5\ndatasets: {a: b}\n---\n# odd card\n"
    hub.create_repo("alice/odd-card-lora", owner_token=ALICE,
                    files=adapter_files(models["adapter"], "bob/tiny-llama", card=card))
    code, _, err = run_cli(capsys, "run", "alice/odd-card-lora", "--repo", "alice/odd-card-merged")
    assert code == 0, err
    path = tmp_path / "README.md"
    path.write_bytes(hub.files("alice/odd-card-merged")["README.md"])
    data = ModelCard.load(path).data.to_dict()
    assert data["license"] == "apache-2.0" and data["language"] == ["en"]  # the base's clean values
    assert data["datasets"] == ["bob/pretraining"]


def test_yaml_alias_bomb_gives_a_short_error(hub, capsys, tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 8)]
    lines += ["jobs:", "  - {adapter: a/b, repo: c/d, base: *a7}"]
    batch = tmp_path / "bomb.yaml"
    batch.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "batch", str(batch))
    assert code == 2 and len(err) < 400


def test_preflight_sizes_come_from_hub_metadata_and_short_disk_stops_before_download(hub, models, capsys,
                                                                                     monkeypatch):
    from collections import namedtuple

    from bot.jobs import PublishJob
    from bot.preflight import preflight

    spec = PublishJob(adapter="alice/tiny-lora", repo="alice/sized").merge_spec(Path("unused"), ALICE)
    checked = preflight(spec, check_disk=False)
    adapter_files_ = hub.files("alice/tiny-lora", checked.adapter_pin.revision)
    base_files = hub.files("bob/tiny-llama", checked.base_pin.revision)
    wanted_adapter = ("adapter_config.json", "adapter_model.safetensors", "README.md")
    wanted_base = ("config.json", "generation_config.json", "model.safetensors", "README.md")
    assert checked.download_bytes == sum(len(adapter_files_[f]) for f in wanted_adapter) + \
        sum(len(base_files[f]) for f in wanted_base if f in base_files)
    assert checked.output_bytes == len(base_files["model.safetensors"])  # float32 stays float32

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("bot.preflight.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    before = len(hub.requests_log)
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/no-room")
    assert code == 8 and "not enough free disk space" in error_line(err)
    assert not [r for r in hub.requests_log[before:] if r[1].endswith("/model.safetensors")]
    assert not hub.repo_exists("alice/no-room")


def test_rejected_token_on_a_read_is_exit_11(hub, models, capsys, tmp_path):
    bad = "hf_rejectedTESTtoken000000000000000000000"
    code, _, err = run_cli(capsys, "merge", "alice/tiny-lora", "--out", str(tmp_path / "m"), "--quiet", token=bad)
    assert code == 11 and "rejected the token" in error_line(err) and bad not in err


def test_transient_errors_on_reads_are_retried(hub, models, capsys, monkeypatch, caplog, tmp_path):
    import bot.transport

    monkeypatch.setattr(bot.transport, "READ_RETRY_WAITS", (0.01, 0.01))
    hub.fail_next("GET", r"^/api/models/alice/tiny-lora(/revision/.*)?$", status=503, times=2)
    code, _, err = run_cli(capsys, "merge", "alice/tiny-lora", "--out", str(tmp_path / "m"), "--quiet")
    assert code == 0, err
    assert "transient Hub error on a read (503)" in caplog.text
    hub.fail_next("GET", r"^/api/models/alice/tiny-lora(/revision/.*)?$", status=503, times=10)
    code, _, err = run_cli(capsys, "merge", "alice/tiny-lora", "--out", str(tmp_path / "m2"), "--quiet")
    hub.reset_faults()
    assert code == 13 and "HTTP 503" in error_line(err) and "retry later" in error_line(err)


def test_a_pr_the_owner_closed_is_not_opened_again(hub, models, capsys):
    from huggingface_hub import HfApi

    hub.create_repo("bob/declines", owner_token=BOB, files={"README.md": b"# no thanks\n"})
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/declines", "--pr")
    assert code == 0, err
    (pr,) = [d for d in hub.discussions("bob/declines") if d["is_pull_request"]]
    HfApi(token=BOB).change_discussion_status("bob/declines", pr["num"], "closed", comment="not for us")
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/declines", "--pr")
    assert code == 0 and "closed the pull request" in out and f"/discussions/{pr['num']}" in out
    assert len([d for d in hub.discussions("bob/declines") if d["is_pull_request"]]) == 1
