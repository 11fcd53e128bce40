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
from space.handlers import (EMPTY_PREFLIGHT, merge_and_publish, on_space, preflight_view,  # noqa: E402
                            target_view)

FORM_QUEUE = int(os.environ.get("MERGEBOT_FORM_QUEUE", "16")) if os.environ.get("MERGEBOT_FORM_QUEUE", "16").isdigit() \
    else 16  # people waiting at the form (the bot's own queue is MERGEBOT_MAX_QUEUE)
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


QUEUE_COLUMNS = ["job", "state", "adapter", "target", "requested by", "created (UTC)", "finished (UTC)", "link",
                 "progress"]


def build_app(service=None) -> gr.Blocks:
    """The page; with a self-service ``service`` it also gets a Queue tab."""
    with gr.Blocks(title="merge-bot") as demo:
        gr.Markdown(INTRO)
        if login_available():
            gr.LoginButton()
        else:
            gr.Markdown("Local mode: set `HF_TOKEN` to act as your account.")
        with gr.Tab("Merge"):
            follows = _merge_tab()
        demo.load(None, outputs=follows, js="() => true")  # a page's target follows the adapter; an API call's not
        if service is not None:
            with gr.Tab("Queue"):
                gr.Markdown(f"Requests written as `/merge owner/adapter` in the discussions of "
                            f"`{service.config.requests_repo}` are answered there. Jobs, newest first:")
                table = gr.Dataframe(headers=QUEUE_COLUMNS, value=service.queue.status_rows(), interactive=False,
                                     elem_id="queue")
                refresh = gr.Button("Refresh", elem_id="refresh-queue")
                refresh.click(service.queue.status_rows, outputs=table, api_name=False, queue=False)
                demo.load(service.queue.status_rows, outputs=table, api_name=False, queue=False)
    demo.queue(default_concurrency_limit=1, max_size=FORM_QUEUE)
    return demo


def _merge_tab() -> gr.Checkbox:
    with gr.Row():
        with gr.Column():
            adapter = gr.Textbox(label="Adapter", placeholder="owner/adapter-name[@revision] or its huggingface.co address",
                                 elem_id="adapter")
            base = gr.Textbox(label="Base model override (optional)", placeholder="owner/base-model", elem_id="base")
            repo = gr.Textbox(label="Target repo", placeholder="you/adapter-name-merged (follows the adapter until "
                                                              "you edit it)", elem_id="repo")
            # Tracked in the browser (no server round trip can race the user's typing): the page starts
            # with the target following the adapter; typing a target of one's own stops that. An API
            # call leaves it off, so its target is taken as given.
            follows = gr.Checkbox(value=False, visible=False, elem_id="target-follows")
            suggested = gr.Textbox(visible=False, elem_id="suggested")
            with gr.Row():
                dtype = gr.Dropdown(list(DTYPES), value="auto", label="Output dtype", elem_id="dtype")
                private = gr.Checkbox(label="Private repo", value=False, elem_id="private")
                pr_mode = gr.Checkbox(label="Open a pull request on an existing repo", value=False, elem_id="pr-mode")
                verify = gr.Checkbox(label="Verify against PEFT", value=True, elem_id="verify")
            target = gr.Markdown(target_view("", False, False), elem_id="target")
            check = gr.Button("Check", elem_id="check")
            run = gr.Button("Merge and publish", variant="primary", elem_id="merge")
        with gr.Column():
            preflight = gr.Markdown(EMPTY_PREFLIGHT, elem_id="preflight")
            result = gr.Markdown(elem_id="result")
            with gr.Tab("Model card", elem_id="card-tab"):
                card = gr.Markdown(elem_id="card")
            with gr.Tab("Card source", elem_id="card-source-tab"):
                card_source = gr.Code(label="README.md", language="markdown", elem_id="card-source")

    # .input fires on the user's own typing only (not when a handler fills the field in).
    repo.input(None, inputs=repo, outputs=follows, js="(text) => !(text || '').trim()")
    for field in (repo, private, pr_mode):
        field.change(target_view, inputs=[repo, private, pr_mode], outputs=target, queue=False, api_name=False)
    checks = dict(fn=preflight_view, inputs=[adapter, base, dtype, repo, follows], outputs=[preflight, suggested],
                  concurrency_limit=4, api_name=False)
    # The suggestion lands in the field only if it still follows when the answer arrives (decided in the browser).
    take = dict(fn=None, inputs=[suggested, follows, repo], outputs=repo, js="(s, f, r) => (f && s) ? s : r")
    for event in (adapter.submit, adapter.blur, base.submit, base.blur):
        event(**checks).then(**take)
    check.click(**{**checks, "api_name": "preflight"}).then(**take)
    run.click(merge_and_publish, inputs=[adapter, base, repo, private, pr_mode, dtype, verify, follows],
              outputs=[result, preflight, card, card_source], concurrency_limit=1, concurrency_id="merge",
              api_name="merge")
    return follows


def self_service():
    """The self-service bot when its settings are present (MERGEBOT_WEBHOOK_SECRET), else None."""
    if not os.environ.get("MERGEBOT_WEBHOOK_SECRET"):
        return None
    from bot.service.worker import service_from_env

    return service_from_env()


def serve(demo: gr.Blocks, service) -> None:
    """With the bot: one FastAPI app serving the webhook and the page; without: gradio's own launch."""
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    if service is None:
        demo.launch(server_name=host, server_port=port, show_error=False)
        return
    import uvicorn

    from bot.service.webhook import create_app

    service.start()
    app = gr.mount_gradio_app(create_app(service), demo, path="/", show_error=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main() -> int:
    from bot.errors import MergeBotError, redact

    try:
        bot_service = self_service()
    except MergeBotError as e:
        print(f"Error: {redact(str(e), os.environ.get('HF_TOKEN'))}", file=sys.stderr)
        return e.exit_code
    serve(build_app(bot_service), bot_service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    demo = build_app()  # `gradio space/app.py` (reload mode) and imports find the page here
