"""merge-bot: fold a PEFT adapter into its base model, exactly and in bounded memory."""

__version__ = "0.1.0"
