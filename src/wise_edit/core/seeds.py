"""Every random stream an editor draws from, derived from the config's seed in one place.

Each stream is a CPU generator seeded from (config seed, what it is for, where it is
used), so a run is reproducible from the config alone, independent of the device, and
the same after save/load. The multipliers are distinct primes so that streams of
different purposes do not share seeds for small indices. Changing one changes every
result that depends on it.
"""

from __future__ import annotations

import torch

UNRELATED_PRIME = 7919  # unrelated prompts drawn for edit n
REPLAY_PRIME = 104_729  # earlier edits replayed in edit n (WISE-Retrieve)
MASK_SEED_PRIME = 1_000_003  # shard masks of (memory, merge group)
MASK_MEMORY_PRIME = 10_007
REHEARSAL_PRIME = 1_299_709  # a memory's earlier edits rehearsed in edit n
CANDIDATE_PRIME = 15_485_863  # the pool prompts hard negatives are chosen among
MERGE_SEED_DELTA = 1  # DARE's random drops use the mask stream of seed + 1


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unrelated_generator(seed: int, edit_index: int) -> torch.Generator:
    return generator(seed * UNRELATED_PRIME + edit_index)


def candidate_generator(seed: int) -> torch.Generator:
    return generator(seed * CANDIDATE_PRIME + 1)


def replay_generator(seed: int, edit_index: int) -> torch.Generator:
    return generator(seed * REPLAY_PRIME + edit_index)


def rehearsal_generator(seed: int, edit_index: int) -> torch.Generator:
    return generator(seed * REHEARSAL_PRIME + edit_index)


def mask_generator(seed: int, memory: int, group: int) -> torch.Generator:
    """Shard masks per (memory, merge group): reproducible from the seed alone and
    independent of how many edits ran before."""
    return generator(seed * MASK_SEED_PRIME + memory * MASK_MEMORY_PRIME + group)


def merge_generator(seed: int, memory: int, group: int) -> torch.Generator:
    return mask_generator(seed + MERGE_SEED_DELTA, memory, group)
