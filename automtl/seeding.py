"""One seed from many parts, the same in every process: how automtl makes randomness reproducible.

Data order, held-out splits, Gumbel noise, random loss weights and the synthetic scenes each draw
from a ``torch.Generator`` seeded with ``stable_seed(purpose, run seed, step, ...)``, so a resumed
run and every DDP rank draw exactly what an uninterrupted single process would.
"""
from __future__ import annotations

import hashlib

__all__ = ["stable_seed"]


def stable_seed(*parts) -> int:
    """A 63-bit seed (``0 <= seed < 2**63``) from the ``str`` of each part, identical in every process
    and Python version (unlike ``hash()`` of a str): BLAKE2b of the parts joined by ``/``."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
