"""Alignment losses of the GTCC family; `sequences` is a list of (T_i, D) embeddings of one batch."""

from core.losses.gtcc import gtcc_loss
from core.losses.lav import lav_loss
from core.losses.tcc import tcc_loss
from core.losses.vava import vava_loss

__all__ = ["gtcc_loss", "lav_loss", "tcc_loss", "vava_loss"]
