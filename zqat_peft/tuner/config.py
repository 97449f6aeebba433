"""ZeroQATConfig: what to quantize, how, and which part is trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft import PeftConfig

from ..quant import ACT_BITS, WEIGHT_BITS, check_act_bits, check_weight_bits
from .registration import zqat_peft_type

TRAINABLE_MODES = ("full", "lightweight", "scales", "act_clip", "none")
INIT_MODES = ("rtn", "calibrate")
ROUNDING_MODES = ("nearest", "gptq")
GPTQ_MASTERS = ("rounded", "compensated")


@dataclass
class ZeroQATConfig(PeftConfig):
    """Configuration of a ZeroQAT model (quantization-aware training with zeroth-order gradients).

    Every targeted nn.Linear becomes a `ZQATLinear`. Its weight lives in one of two forms:

    - *trained*: a full-precision master weight, fake-quantized in every forward (and the layer's
      input too when ``a_bits < 16``); the ZO trainer updates the master weight.
    - *packed*: integer codes packed GPTQ-style plus per-group scales/zeros; the float weight is freed,
      and the layer dequantizes on the fly.

    ``trainable`` picks which layers are trained:
    ``"full"`` every targeted layer; ``"lightweight"`` only ``trainable_modules`` (q_proj/v_proj by
    default), the rest packed and frozen; ``"scales"`` every layer packed, only the per-group scales
    are trained (QZO-style); ``"act_clip"`` every layer packed, only its activation clipping ratio
    (``act_clip`` < 1: one number per layer) trained; ``"none"`` every layer packed and frozen, only
    ``modules_to_save`` trained (e.g. the RMSNorm weights: a few thousand per-channel factors in place of
    millions of scales). ``modules_to_save`` train with any mode.

    ``kv_bits < 16`` fake-quantizes the *outputs of the key and value projections* (``kv_modules``), per
    token and attention head. That is where ZeroQAT's layers sit: transformers applies rotary position
    embeddings (LLaMA, Qwen2, Mistral, Gemma, GPT-NeoX, Phi) after the projection, so keys are quantized
    *before* RoPE, as a cache that stores pre-RoPE keys would (KVQuant), not after it as OmniQuant/QuaRot
    quantize the cached keys; values, and the keys of models without rotary embeddings (OPT), are exactly
    what the cache holds. Queries are never quantized: for a fused query/key/value projection (GPT-NeoX's
    ``query_key_value``, Phi-3's ``qkv_proj``) only its key and value heads are.

    ``rotate=True`` rotates the residual stream first (zqat_peft.rotation), and with ``online_hadamard`` (the
    default) each down_proj also rotates its input online with a Hadamard matrix: the 4-bit activations of
    the SwiGLU product lose their outlier channels. It is a separate switch because it adds a transform at
    run time that the integer export formats cannot carry.

    ``init="rtn"`` packs frozen layers right away (round-to-nearest). ``init="calibrate"`` keeps them in
    float form until `zqat_peft.calibrate(model, data)` has learned clipping (and smoothing), then packs
    them and sets ``calibrated=True``; a model loaded from such a checkpoint is rebuilt packed. With
    ``rounding="gptq"`` calibration then rounds each layer with GPTQ on the calibrated grid (trained
    layers' master weights start from that rounding too).
    """

    w_bits: int = field(default=4, metadata={"help": f"Weight bits, one of {WEIGHT_BITS}."})
    a_bits: int = field(default=16, metadata={"help": f"Activation bits, one of {ACT_BITS}; 16 = weight-only."})
    act_clip: float = field(
        default=1.0,
        metadata={"help": "With a_bits < 16: the fraction of each token's activation range the quantizer keeps (values "
                          "beyond it saturate), one ratio per layer starting here, which the scale refinement and ZO "
                          "(with the layer's weights or scales, or alone with trainable='act_clip') train; 1.0 = "
                          "min-max, and then no ratio exists to train (QuaRot clips at 0.9)."},
    )
    kv_bits: int = field(
        default=16,
        metadata={
            "help": "Bits of the key/value projections' outputs, per token and head (before rotary embeddings); "
            "16 = off. See the class docstring for how this relates to a quantized KV cache."
        },
    )
    group_size: int = field(
        default=128, metadata={"help": "Weights per quantization group along the input dimension; -1 = per channel."}
    )
    symmetric: bool = field(default=False, metadata={"help": "Symmetric weight quantization (default asymmetric)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={"help": "Modules to quantize (names, suffixes or a regex); 'all-linear' = every Linear but lm_head."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules not to quantize (names, suffixes or a regex)."}
    )
    trainable: Literal["full", "lightweight", "scales", "act_clip", "none"] = field(
        default="full", metadata={"help": f"Which parameters the ZO trainer updates: one of {TRAINABLE_MODES}."}
    )
    trainable_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "With trainable='lightweight': name suffixes of the layers that keep master weights."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the quantized layers that ZO training updates in full precision and the "
                          "adapter saves (peft's modules_to_save), e.g. ['input_layernorm', 'post_attention_layernorm'] "
                          "to train the RMSNorm weights: few parameters that rescale every input channel of the "
                          "quantized layers after them."},
    )
    kv_modules: list[str] = field(
        default_factory=lambda: ["k_proj", "v_proj", "query_key_value", "qkv_proj"],
        metadata={"help": "Name suffixes of the projections whose outputs are quantized at kv_bits."},
    )
    init: Literal["rtn", "calibrate"] = field(
        default="rtn", metadata={"help": f"Initialization of the quantizer: one of {INIT_MODES}."}
    )
    smooth: bool = field(
        default=True,
        metadata={"help": "With a_bits < 16 and init='calibrate': learn a per-channel smoothing scale at each layer input."},
    )
    calib_epochs: int = field(default=2, metadata={"help": "Epochs of block-wise calibration over the calibration set."})
    calib_lr: float = field(default=1e-2, metadata={"help": "Learning rate of the clipping logits in calibration."})
    calib_smooth_lr: float = field(default=5e-3, metadata={"help": "Learning rate of the smoothing scales."})
    calib_alpha: float = field(default=0.5, metadata={"help": "SmoothQuant migration strength of the initial scales."})
    calib_refine_epochs: int = field(
        default=0,
        metadata={"help": "After rounding: epochs of Adam on the packed layers' per-group scales (codes kept), their "
                          "act_clip ratios and the block's modules_to_save norms, against the block's full-precision "
                          "output (0: none)."},
    )
    calib_refine_lr: float = field(
        default=1e-3, metadata={"help": "Learning rate of scale refinement, a relative step (p0 * (1 + d))."}
    )
    calibrated: bool = field(
        default=False, metadata={"help": "Set by zqat_peft.calibrate once calibration has run; not set by hand."}
    )
    rounding: Literal["nearest", "gptq"] = field(
        default="nearest",
        metadata={"help": "With init='calibrate': how weights are rounded onto the calibrated grid, 'nearest' or "
                          "'gptq' (error-compensating, on the calibration inputs; zqat_peft.calibration.gptq)."},
    )
    gptq_damp: float = field(
        default=0.01, metadata={"help": "GPTQ dampening: fraction of the mean Hessian diagonal added to it."}
    )
    gptq_block_size: int = field(default=128, metadata={"help": "GPTQ: columns per block of deferred updates."})
    gptq_act_order: bool = field(
        default=True,
        metadata={"help": "GPTQ: round the columns in decreasing order of input power, each keeping its own group "
                          "(static act-order: exports and packing unchanged)."},
    )
    gptq_master: Literal["rounded", "compensated"] = field(
        default="rounded",
        metadata={"help": "GPTQ: the master weight ZO trains starts as the rounded weight ('rounded', on the grid "
                          "points) or as GPTQ's error-compensated weight ('compensated', the same codes, off them)."},
    )
    rotate: bool = field(
        default=False,
        metadata={"help": "Rotate the residual stream (QuaRot-style, zqat_peft.rotation) before quantizing: "
                          "LLaMA-style models; the same seed rebuilds the same rotated base when the adapter is loaded."},
    )
    rotation_seed: int = field(default=0, metadata={"help": "Seed of the random orthogonal rotation."})
    online_hadamard: bool = field(
        default=True,
        metadata={"help": "With rotate: each down_proj multiplies its input by a Hadamard matrix H at run time, before "
                          "quantizing it, and holds W H as its weight (QuaRot's online Hadamard; exact in float). Only "
                          "the merged export carries it: GPTQ, compressed-tensors and GGUF refuse such a model."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = zqat_peft_type()
        check_weight_bits(self.w_bits)
        check_act_bits(self.a_bits, "a_bits")
        check_act_bits(self.kv_bits, "kv_bits")
        if not 0 < self.act_clip <= 1:
            raise ValueError(f"act_clip is the fraction of each token's activation range kept, in (0, 1]; got "
                             f"{self.act_clip}.")
        if self.act_clip != 1 and self.a_bits == 16:
            raise ValueError(f"act_clip={self.act_clip} clips quantized activations, and a_bits=16 quantizes none: set "
                             "a_bits (e.g. 4) or leave act_clip at 1.0.")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be a positive number of weights or -1 (per channel), got {self.group_size}.")
        if self.trainable not in TRAINABLE_MODES:
            raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {self.trainable!r}.")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}.")
        self._check_rounding()
        if self.trainable == "lightweight" and not self.trainable_modules:
            raise ValueError("trainable='lightweight' needs trainable_modules (e.g. ['q_proj', 'v_proj']).")
        if self.trainable == "none" and not self.modules_to_save:
            raise ValueError("trainable='none' trains no parameter of the quantized layers, only modules_to_save, "
                             "and none is set: nothing would be trained. Name them (e.g. modules_to_save="
                             "['input_layernorm', 'post_attention_layernorm', 'norm']) or use trainable='scales'.")
        if self.trainable == "act_clip" and (self.a_bits == 16 or self.act_clip == 1):
            raise ValueError(f"trainable='act_clip' trains each layer's activation clipping ratio, and with a_bits="
                             f"{self.a_bits}, act_clip={self.act_clip} the layers have none: set a_bits below 16 and "
                             "act_clip below 1 (e.g. a_bits=4, act_clip=0.85), or use trainable='scales'.")
        if self.modules_to_save is not None and (
                isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise ValueError(f"modules_to_save takes a list of module names (e.g. ['input_layernorm', "
                             f"'post_attention_layernorm']), got {self.modules_to_save!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def _check_rounding(self) -> None:
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}.")
        if self.rounding == "gptq" and self.init != "calibrate":
            raise ValueError("rounding='gptq' rounds on calibration inputs: it needs init='calibrate'.")
        if self.gptq_master not in GPTQ_MASTERS:
            raise ValueError(f"gptq_master must be one of {GPTQ_MASTERS}, got {self.gptq_master!r}.")
        if self.calib_refine_epochs < 0 or self.calib_refine_lr < 0:
            raise ValueError(f"calib_refine_epochs and calib_refine_lr must be >= 0, got {self.calib_refine_epochs} and "
                             f"{self.calib_refine_lr}.")
        if self.calib_refine_epochs and self.init != "calibrate":
            raise ValueError("calib_refine_epochs refines scales on calibration inputs: it needs init='calibrate'.")
        if self.calib_refine_epochs and self.trainable == "full":
            raise ValueError("calib_refine_epochs refines the scales of packed layers, and trainable='full' packs none "
                             "(ZO trains every master weight): use trainable='scales', 'lightweight', 'act_clip' or "
                             "'none', or no refinement.")
        if self.gptq_damp < 0 or self.gptq_block_size < 1:
            raise ValueError(f"gptq_damp must be >= 0 and gptq_block_size >= 1, got {self.gptq_damp} and "
                             f"{self.gptq_block_size}.")

    def rotates_input(self, module_name: str) -> bool:
        """Whether the layer multiplies its input by a Hadamard matrix online (every down_proj of a rotated model)."""
        return self.rotate and self.online_hadamard and _matches_suffix(module_name, "mlp.down_proj")

    def is_trained(self, module_name: str) -> bool:
        """Whether the layer called `module_name` keeps a master weight that ZO training updates."""
        if self.trainable == "full":
            return True
        if self.trainable in ("scales", "act_clip", "none"):
            return False
        return any(_matches_suffix(module_name, s) for s in self.trainable_modules)

    def trains_act_clip(self, module_name: str) -> bool:
        """Whether ZO training updates the layer's activation clipping ratio (if it has one): with whatever else
        of the layer trains, or alone with trainable='act_clip'."""
        return self.trainable in ("scales", "act_clip") or self.is_trained(module_name)

    def quantizes_output(self, module_name: str) -> bool:
        """Whether the layer's output is fake-quantized at kv_bits (the keys/values of attention)."""
        return self.kv_bits < 16 and any(_matches_suffix(module_name, s) for s in self.kv_modules)

    @property
    def smooths(self) -> bool:
        """Layers carry a smoothing scale: weight-activation quantization that is calibrated."""
        return self.smooth and self.a_bits < 16 and self.init == "calibrate"

    @property
    def packs_frozen_layers(self) -> bool:
        """Frozen layers are packed unless calibration still needs their float weights."""
        return self.init == "rtn" or self.calibrated


def _matches_suffix(module_name: str, suffix: str) -> bool:
    return module_name == suffix or module_name.endswith("." + suffix)
