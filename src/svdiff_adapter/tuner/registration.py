"""Make PEFT's generic functions know the `SPECTRAL_SHIFT` type.

`peft.register_peft_method` refuses names missing from PEFT's `PeftType` enum, and extending that enum needs private
enum internals. What registration does is fill three public dicts keyed by the type, so we fill them directly with
our str-enum member (it hashes and compares like the string "SPECTRAL_SHIFT").
"""

from peft import mapping

from .config import SpectralShiftConfig, SpectralShiftPeftType
from .model import SpectralShiftModel


def register_spectral_shift() -> None:
    """Register the tuner with PEFT (idempotent; done on import of `svdiff_adapter`)."""
    peft_type = SpectralShiftPeftType.SPECTRAL_SHIFT
    owner = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if owner is not None and owner is not SpectralShiftModel:
        raise RuntimeError(f"PEFT type {peft_type.value} is already registered by {owner!r}.")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SpectralShiftConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SpectralShiftModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = SpectralShiftModel.prefix
