"""PEFT's config object for an adapter, built the way the merge needs it.

PEFT validates training schedules when it builds a config, so a finished adapter whose
schedule it dislikes is refused even though merging never reads the schedule: PEFT 0.21
refuses AdaLoRA's ``total_step: null``, which many saved AdaLoRA configs hold. Those fields
are set to neutral values here before PEFT sees them, unknown fields (already warned about)
are left out, and whatever PEFT still refuses becomes one line naming PEFT's reason.
"""
from __future__ import annotations

import warnings
from typing import Any

from bot.adapter import AdapterConfig
from bot.errors import AdapterConfigError, UnsupportedAdapterError

# Per peft_type: fields PEFT uses only while training (budget schedules, optimiser terms) and
# validates at construction, with values that pass that validation. Found by reading every
# mergeable tuner's config ``__post_init__`` in PEFT 0.21: AdaLoRA's rank-budget schedule
# (update_and_allocate) is the only one a saved adapter can carry in a refused state.
# (AdaMSS's ASA schedule is validated too, but its use_asa also shapes the layers it builds,
# so it is left to PEFT.)
TRAINING_ONLY_FIELDS: dict[str, dict[str, Any]] = {
    "ADALORA": {"total_step": 1, "tinit": 0, "tfinal": 0, "orth_reg_weight": 0.5},
}


def merge_kwargs(acfg: AdapterConfig) -> dict[str, Any]:
    """The saved config as PEFT should build it for a merge: training-only fields neutral, unknown ones out."""
    kwargs = {k: v for k, v in acfg.raw.items() if k not in acfg.unknown_fields}
    kwargs["peft_type"] = acfg.peft_type
    kwargs.update(TRAINING_ONLY_FIELDS.get(acfg.peft_type, {}))
    return kwargs


def build_peft_config(acfg: AdapterConfig):
    """``peft.PeftConfig`` for this adapter; a refusal names PEFT's own reason (exit 5) or the unknown tuner (exit 6)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(acfg.peft_type)  # type: ignore[call-overload]  # keyed by a str enum
    if cls is None:
        raise UnsupportedAdapterError(
            f"peft_type {acfg.peft_type} is not known to the installed PEFT; upgrade peft or check adapter_config.json"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about training settings ("r is not used in AdaLora") say nothing here
        try:
            return cls.from_peft_type(**cls.check_kwargs(**merge_kwargs(acfg)))
        except (ValueError, TypeError, KeyError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise AdapterConfigError(
                f"adapter_config.json: the installed PEFT refuses this {acfg.peft_type} config ({reason}); "
                f"fix or re-save the adapter"
            ) from e
