"""Community self-service: merge requests written in Hub discussions, answered there.

config.py    settings from the environment, checked at start-up
commands.py  "/merge owner/adapter [--pr owner/repo] [--dtype D] [--base B]" -> MergeRequest
queue.py     the persistent SQLite job queue (jobs, subscribers, reply outbox, seen events)
webhook.py   POST /webhooks/merge: verify, validate, enqueue, answer at once
worker.py    background threads: triage (pre-flight), merges one at a time, replies
"""
