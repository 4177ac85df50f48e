"""Moved: the encoder maths live once in :mod:`scfm_fast.model.layers` (this shim keeps the engines'
imports working until they import it directly; then delete this file)."""

from ..model.layers import EncoderParams, LayerParams, autocast_ctx

__all__ = ["EncoderParams", "LayerParams", "autocast_ctx"]
