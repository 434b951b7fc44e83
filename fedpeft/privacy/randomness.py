"""The randomness that protects a client: its Poisson batches and its DP noise.

Two sources, and every summary says which each mechanism used (`privacy.noise`, summary.json's
`randomness`):

- seeded: a torch generator seeded from the spec's seed, round and client (fedpeft.federation.seed_for).
  A run is then reproducible bit for bit, and whoever knows the spec can regenerate the noise and
  remove it. Fit for simulation, where the simulator is both the server and every client.
- secret: a `SecretKey` of 256 bits drawn on the node from the operating system's CSPRNG
  (`secrets`, i.e. os.urandom), never sent, never stored. Every draw comes from a ChaCha20
  keystream under a key derived from it and the draw's purpose ("batches", "noise", ...): a
  cryptographic stream, so nobody without the key can predict or replay a draw, and nothing is
  lost to a generator's seed width. (torch's CPU generator, MT19937, keeps only the low 32 bits of
  `manual_seed`: a 62-bit secret seed was a 32-bit secret, searchable against a reply.) Uniforms
  take 53 bits of the stream each; Gaussians come from Box-Muller in float64; with `secure`, as
  Opacus's secure_mode, each noise value is the sum of four draws over 2, against floating-point
  attacks on the low bits of one Gaussian. Dropout, which protects nothing but would let a
  replay line up, is drawn from torch's generator with its whole state (19,937 bits) filled from
  the key. Flower nodes always use this.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "NOISE_SOURCES", "Source", "TorchSource", "KeyedSource", "SecretKey", "Seed", "gaussian", "batch_source",
    "noise_source", "seed_dropout", "source_for", "combined", "as_source",
]  # fmt: skip

NOISE_SOURCES = ("seeded", "secret")
KEY_BYTES = 32  # 256-bit keys (ChaCha20's key size); the issue's floor is 128


class SecretKey:
    """256 secret bits, the root of one client's (or one server mechanism's) randomness for one use.
    Never serialised: its repr and str show no key material."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a SecretKey holds {KEY_BYTES} bytes, not {len(key)}")
        self._key = bytes(key)

    @classmethod
    def draw(cls) -> SecretKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def derive(self, purpose: str) -> bytes:
        """The subkey for one purpose: BLAKE2b keyed with this key over the purpose's name."""
        return hashlib.blake2b(purpose.encode(), key=self._key, digest_size=KEY_BYTES).digest()

    def stream(self, purpose: str) -> KeyedSource:
        return KeyedSource(self.derive(purpose))

    def __repr__(self) -> str:
        return "SecretKey(<hidden>)"

    __str__ = __repr__

    def __reduce__(self):  # noqa: ANN204
        raise TypeError("a SecretKey is never pickled or sent: draw one where it is used")


Seed = int | SecretKey  # a client's randomness for one round: a public seed, or a secret key


class Source(Protocol):
    """Where one mechanism's draws come from."""

    def rand(self, n: int) -> torch.Tensor:
        """n uniforms in [0, 1)."""
        ...

    def normal(self, std: float, shape: torch.Size | tuple[int, ...], secure: bool, device: torch.device | str) -> torch.Tensor:  # fmt: skip
        """N(0, std^2) noise of `shape`, float32 on `device`."""
        ...


class TorchSource:
    """A torch generator (the seeded path): the same draws as torch.rand / torch.normal with it."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)

    def normal(self, std: float, shape: torch.Size | tuple[int, ...], secure: bool, device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
        return gaussian(std, shape, self.generator, secure, device)


class KeyedSource:
    """A ChaCha20 keystream under a 256-bit key: uniforms of 53 bits, Gaussians by Box-Muller."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        # ChaCha20's 16-byte nonce is the block counter and nonce; the key is used for this stream only
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def words(self, n: int) -> np.ndarray:
        """n uniform 64-bit words of the keystream."""
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def uniform64(self, n: int) -> np.ndarray:
        """n uniforms in [0, 1), float64, each from the top 53 bits of one word."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def rand(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.uniform64(n))

    def standard(self, n: int) -> torch.Tensor:
        """n standard Gaussians, float64: Box-Muller, both halves of each pair used (torch's vectorised
        log, sqrt, cos and sin: about 3x numpy's here)."""
        pairs = (n + 1) // 2
        u = self.rand(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))  # 1 - u in (0, 1]: log is finite
        angle = (2.0 * math.pi) * u[pairs:]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]

    def normal(self, std: float, shape: torch.Size | tuple[int, ...], secure: bool, device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
        n = math.prod(shape)
        if std == 0:
            return torch.zeros(tuple(shape), device=device)
        if secure:  # Opacus's secure_mode construction: the sum of four draws over 2 (same variance)
            z = self.standard(4 * n).reshape(4, n).sum(0) / 2
        else:
            z = self.standard(n)
        return (z * std).reshape(tuple(shape)).to(device=device, dtype=torch.float32)


def as_source(source: Source | torch.Generator) -> Source:
    """A torch generator as a Source (callers and tests that still hold one); a Source as it is."""
    return TorchSource(source) if isinstance(source, torch.Generator) else source


def gaussian(std: float, shape: torch.Size | tuple[int, ...], generator: torch.Generator, secure: bool,
             device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """N(0, std^2) noise of `shape` from a torch generator; `secure`: as Opacus's secure_mode (discard
    one draw, then the sum of four draws over 2, which has the same variance)."""
    if not secure:
        return torch.normal(0.0, std, size=tuple(shape), device=device, generator=generator)
    torch.normal(0.0, std, size=(1, 1), device=device, generator=generator)
    total = torch.zeros(tuple(shape), device=device)
    for _ in range(4):
        total += torch.normal(0.0, std, size=tuple(shape), device=device, generator=generator)
    return total / 2


def source_for(seed: Seed, purpose: str, offset: int = 0, device: torch.device | str = "cpu") -> Source:
    """One mechanism's source: the key's stream for `purpose`, or a torch generator at seed + `offset`."""
    if isinstance(seed, SecretKey):
        return seed.stream(purpose)
    return TorchSource(torch.Generator(device=device).manual_seed(seed + offset))


def batch_source(seed: Seed) -> Source:
    """A client's Poisson batches (seeded: a generator at `seed`, as before keys existed)."""
    return source_for(seed, "batches", 0)


def noise_source(seed: Seed, device: torch.device | str = "cpu") -> Source:
    """A client's DP-SGD noise (seeded: a generator at `seed` + 1 on the model's device)."""
    return source_for(seed, "noise", 1, device)


def combined(seeds: list[Seed]) -> Seed:
    """One seed for draws shared by several clients (a cohort's dropout): derived from their seeds, or
    a fresh key when any of them is secret."""
    if any(isinstance(s, SecretKey) for s in seeds):
        return SecretKey.draw()
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0])


def seed_dropout(seed: Seed, device: torch.device | str = "cpu") -> None:
    """Seed torch's global generator for dropout: at `seed` + 2, or with its whole state from the key."""
    if not isinstance(seed, SecretKey):
        torch.manual_seed(seed + 2)
        return
    stream = seed.stream("dropout")
    generator = torch.Generator()
    generator.manual_seed(0)
    state = generator.get_state().clone()
    # the CPU generator's state: seed (8 bytes), left, seeded (4 + 4), next (8), then 624 uint64 slots of
    # MT19937's 32-bit words; fill the words (an all-zero state, the one invalid one, has prob. 2^-19968)
    words = stream.words(624) >> np.uint64(32)
    state[24 : 24 + 624 * 8] = torch.from_numpy(words.view(np.uint8).copy())
    torch.random.set_rng_state(state)
    if torch.device(device).type == "cuda":  # CUDA's Philox keeps a 64-bit seed
        torch.cuda.manual_seed(int(stream.words(1)[0]))
