"""Quantization initialization: block-wise calibration of clipping and smoothing."""

from .blocks import calibration_batches, find_decoder_blocks
from .calibrate import calibrate

__all__ = ["calibrate", "calibration_batches", "find_decoder_blocks"]
