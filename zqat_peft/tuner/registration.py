"""Registration of ZeroQAT as a peft method: PeftType "ZQAT", prefix "zqat_".

peft's `register_peft_method` only accepts names that already are members of its `PeftType` enum, and
peft/transformers call `.value` on that member (transformers derives the prefix from it), so the enum is
extended with a real member first. Both steps are idempotent.
"""

from __future__ import annotations

import enum

from peft.utils.peft_types import PeftType

NAME = "ZQAT"
PREFIX = "zqat_"


def zqat_peft_type() -> PeftType:
    """The `PeftType.ZQAT` member, added to peft's enum on first use."""
    if NAME in PeftType.__members__:
        return PeftType[NAME]
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member.__objclass__ = PeftType
    if hasattr(enum.Enum, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)
    # Plain setattr is refused on enum classes (and on 3.12+ members are looked up through the class dict).
    type.__setattr__(PeftType, NAME, member)
    return member


def register_zqat() -> None:
    """Make `get_peft_model`, `PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know ZeroQAT."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import ZeroQATConfig
    from .model import ZeroQATModel

    peft_type = zqat_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=NAME.lower(), config_cls=ZeroQATConfig, model_cls=ZeroQATModel, prefix=PREFIX)
