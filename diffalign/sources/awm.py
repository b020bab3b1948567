"""AWM: DiffusionNFT's inputs (sources/nft.py: every clean sample of the round, forward-noised with keyed t and eps,
the trained, old and reference predictions, the group advantages), but the trained policy samples the rounds; the
EMA old adapter only anchors AWM's second KL term (official `train.off_policy = False`: rollouts with the "default"
adapter, the "ema" one in `ema_kl_loss` alone)."""

from __future__ import annotations

from diffalign.sources.nft import NFT


class AWMSource(NFT):
    name = "awm"
    old_samples = False
