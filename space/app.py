"""merge-bot's Gradio Space: paste an adapter id, sign in, get a merged model repo or a PR.

Run locally with ``python space/app.py`` (token from HF_TOKEN, Hub from HF_ENDPOINT);
the same file is the Space's ``app_file``. The page only lays out components and wires
them to ``space/handlers.py``, which calls the same core as the CLI.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bot` lives at the repo root

import gradio as gr  # noqa: E402

from bot.spec import DTYPES  # noqa: E402
from space.handlers import merge_and_publish, on_space, preflight_view  # noqa: E402

MAX_QUEUE = int(os.environ.get("MERGEBOT_MAX_QUEUE", "16"))
INTRO = """# merge-bot
Merge a PEFT adapter (LoRA, DoRA, IA3, LoHa, LoKr, ...) into its base model and publish the
result as a standalone `transformers` model under your account, or as a pull request on an
existing repo. Everything runs with your own Hugging Face token."""


def login_available() -> bool:
    """gradio's login button needs real OAuth (a Space) or, locally, a token to mock it with."""
    if on_space():
        return True
    from huggingface_hub import get_token

    return get_token() is not None


def build_app() -> gr.Blocks:
    with gr.Blocks(title="merge-bot") as demo:
        gr.Markdown(INTRO)
        if login_available():
            gr.LoginButton()
        else:
            gr.Markdown("Local mode: set `HF_TOKEN` to act as your account.")
        with gr.Row():
            with gr.Column():
                adapter = gr.Textbox(label="Adapter", placeholder="owner/adapter-name[@revision]", elem_id="adapter")
                base = gr.Textbox(label="Base model override (optional)", placeholder="owner/base-model",
                                  elem_id="base")
                repo = gr.Textbox(label="Target repo", placeholder="you/adapter-name-merged", elem_id="repo")
                with gr.Row():
                    dtype = gr.Dropdown(list(DTYPES), value="auto", label="Output dtype", elem_id="dtype")
                    private = gr.Checkbox(label="Private repo", value=False, elem_id="private")
                    pr_mode = gr.Checkbox(label="Open a pull request on an existing repo", value=False,
                                          elem_id="pr-mode")
                    verify = gr.Checkbox(label="Verify against PEFT", value=True, elem_id="verify")
                check = gr.Button("Check", elem_id="check")
                run = gr.Button("Merge and publish", variant="primary", elem_id="merge")
            with gr.Column():
                preflight = gr.Markdown("Enter an adapter id to see what will happen.", elem_id="preflight")
                result = gr.Markdown(elem_id="result")
                card = gr.Code(label="Generated model card", language="markdown", elem_id="card")

        checks = dict(fn=preflight_view, inputs=[adapter, base, dtype, repo], outputs=[preflight, repo],
                      concurrency_limit=4, api_name=False)
        adapter.submit(**checks)
        base.submit(**checks)
        check.click(**{**checks, "api_name": "preflight"})
        run.click(merge_and_publish, inputs=[adapter, base, repo, private, pr_mode, dtype, verify],
                  outputs=[result, card], concurrency_limit=1, concurrency_id="merge", api_name="merge")
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    return demo


demo = build_app()

if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), show_error=False)
