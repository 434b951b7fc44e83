"""The randomness that protects a client: its Poisson batches and its DP noise.

Two sources, and every summary says which was used (`privacy.noise`):

- seeded: derived from the spec's seed, round and client (fedpeft.federation.seed_for). A run is
  then reproducible bit for bit, and whoever knows the spec can regenerate the noise and remove
  it. Fit for simulation, where the simulator is both the server and every client.
- secret: drawn on the client from the operating system's CSPRNG (`secrets`, i.e. os.urandom),
  never sent, never stored; the noise uses Opacus's secure_mode (each Gaussian draw is the mean of
  four, against floating-point attacks). The draws themselves come from torch's Mersenne Twister
  seeded with those 62 secret bits: secret from the server, but not a CSPRNG (torchcsprng, which
  Opacus would use, does not build with torch 2.13). Flower nodes always use this.
"""

from __future__ import annotations

import secrets

import torch

__all__ = ["NOISE_SOURCES", "gaussian", "secret_seed"]

NOISE_SOURCES = ("seeded", "secret")


def secret_seed() -> int:
    """62 bits from the OS CSPRNG; room above for the +1, +2 offsets a client derives from it."""
    return secrets.randbits(62)


def gaussian(std: float, shape: torch.Size | tuple[int, ...], generator: torch.Generator, secure: bool,
             device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """N(0, std^2) noise of `shape`; `secure`: as Opacus's secure_mode (discard one draw, then the sum
    of four draws over 2, which has the same variance)."""
    if not secure:
        return torch.normal(0.0, std, size=tuple(shape), device=device, generator=generator)
    torch.normal(0.0, std, size=(1, 1), device=device, generator=generator)
    total = torch.zeros(tuple(shape), device=device)
    for _ in range(4):
        total += torch.normal(0.0, std, size=tuple(shape), device=device, generator=generator)
    return total / 2
