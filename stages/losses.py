"""Kept so code written against earlier kdcache keeps importing: the losses live in
kdcache.stages.train.losses (and ``kdcache.build_loss`` / ``kdcache.chunked_loss``)."""

from kdcache.stages.train.losses import LOSSES, Targets, build_loss, chunked_loss

__all__ = ["LOSSES", "Targets", "build_loss", "chunked_loss"]
