"""One seed from many parts, the same in every process: how automtl makes randomness reproducible.

Data order, held-out splits, Gumbel noise, random loss weights and the synthetic scenes each draw
from a ``torch.Generator`` seeded with ``stable_seed(purpose, run seed, step, ...)``, so a resumed
run and every DDP rank draw exactly what an uninterrupted single process would. The build's checks run
two programs from one random state with :func:`seeded`.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import sys
from typing import Optional

import torch

__all__ = ["stable_seed", "seeded", "random_states", "moved_generators", "same_state", "is_generator",
           "generator_state", "set_generator_state", "check_mt19937", "python_state"]


def stable_seed(*parts) -> int:
    """A 63-bit seed (``0 <= seed < 2**63``) from the ``str`` of each part, identical in every process
    and Python version (unlike ``hash()`` of a str): BLAKE2b of the parts joined by ``/``."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(device: torch.device, seed: Optional[int] = 0):
    """Run the block from the random state ``seed`` on the CPU, on ``device``, in Python's ``random`` and numpy's
    global generator (``seed=None``: from their current states, unseeded), and restore them after it: two blocks entered the same way draw the same numbers (dropout masks), and nothing outside sees
    a draw."""
    fork = dict(devices=[], device_type="cuda") if device.type == "cpu" else dict(devices=[device],
                                                                                     device_type=device.type)
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")  # seeded too where a forward draws from it, never imported for that
    numpy_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(**fork):
        if seed is not None:
            random.seed(seed)
            if numpy is not None:
                numpy.random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            elif device.type != "cpu":
                getattr(torch, device.type).manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def random_states(device: torch.device) -> dict:
    """The state of each global generator a forward can draw from: torch's on the CPU and on ``device``, Python's
    ``random`` and numpy's (where numpy is imported), by name, for :func:`moved_generators`."""
    states = {"torch's global generator": torch.random.get_rng_state(), "Python's random module": random.getstate()}
    if device.type == "cuda":
        states["torch's CUDA generator"] = torch.cuda.get_rng_state(device)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy's global generator"] = numpy.random.get_state()
    return states


def moved_generators(before: dict, device: torch.device) -> list:
    """The names of the generators in ``before`` (:func:`random_states`) that have drawn since."""
    now = random_states(device)
    return [name for name, state in before.items() if not same_state(state, now[name])]


def same_state(a, b) -> bool:
    """Whether two generator states (tensors, tuples, dicts, numpy arrays) are equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if hasattr(a, "shape") and hasattr(b, "shape"):  # a numpy array
        return a.shape == b.shape and bool((a == b).all())
    return a == b


def is_generator(value) -> bool:
    """Whether ``value`` is a random generator: torch's, Python's (``random.Random``) or numpy's (``Generator``,
    the legacy ``RandomState``), told apart without importing numpy."""
    return (isinstance(value, (torch.Generator, random.Random))
            or hasattr(value, "bit_generator") and hasattr(value.bit_generator, "state")
            or hasattr(value, "get_state") and type(value).__module__.startswith("numpy"))


def generator_state(generator):
    """The state of a generator (see :func:`is_generator`), as :func:`set_generator_state` takes it back."""
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, random.Random):
        return generator.getstate()
    if hasattr(generator, "bit_generator"):
        return generator.bit_generator.state
    return generator.get_state()


def set_generator_state(generator, state) -> None:
    """Put ``generator`` back at ``state`` (from :func:`generator_state`; Python's with its key as any sequence).

    Raises:
        ValueError: a state that would put the generator out of its own bounds, which numpy does not check (an
            MT19937 position beyond its 624 key words reads past them: garbage, or a crash at the next draw).
    """
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, random.Random):
        generator.setstate(python_state(state))
    elif hasattr(generator, "bit_generator"):
        if isinstance(state, dict) and state.get("bit_generator") == "MT19937":
            check_mt19937(state["state"]["key"], state["state"]["pos"])
        generator.bit_generator.state = state
    else:
        check_mt19937(state[1], state[2], state[3])
        generator.set_state(state)


#: Words in the Mersenne Twister's key (numpy's and Python's).
MT19937_WORDS = 624


def check_mt19937(key, pos, has_gauss: int = 0) -> None:
    """Raise ValueError unless ``key``, ``pos`` (and the legacy ``has_gauss``) are an MT19937 state's."""
    if len(key) != MT19937_WORDS or isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= MT19937_WORDS \
            or has_gauss not in (0, 1):
        raise ValueError(f"an MT19937 state has {MT19937_WORDS} key words, a position from 0 to {MT19937_WORDS} and "
                         f"a Gaussian flag of 0 or 1, not {len(key)} words at position {pos!r} with flag {has_gauss!r}")


def python_state(state) -> tuple:
    """``state`` as ``random.setstate`` takes it, its key words checked to be 32-bit (Python raises OverflowError on
    a larger one, and takes a negative one as another number)."""
    version, words, gauss = state
    words = tuple(words)
    if not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2 ** 32 for w in words):
        raise ValueError("a Python random state's key words are integers from 0 to 2**32 - 1")
    if version != 3 or len(words) != MT19937_WORDS + 1 or words[-1] > MT19937_WORDS:
        raise ValueError(f"a Python random state is version 3 with {MT19937_WORDS} key words and a position from 0 "
                         f"to {MT19937_WORDS}, not version {version!r} with {len(words) - 1} words at {words[-1:]}")
    return version, words, gauss
