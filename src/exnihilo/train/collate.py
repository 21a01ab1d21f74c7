"""Collate: examples → (input_ids, labels[, position_ids]) tensors, padded or packed.

Padded (LLMs-from-scratch ch07): append EOS, shift targets by one, pad to the batch's longest
example; every pad position in the targets is -100 except the first, which is the EOS, so
the model learns to stop. ch07 finds pads by value (`targets == pad_id`), which would also
hide real EOS tokens when pad == eos (SmolLM2's "<|im_end|>" is both); we mask by position.
With --mask-prompt every target that is not an assistant token is -100 as well.

No attention mask is built for padded batches: padding sits on the right, and causal
attention never lets a real token see a later position, so real-token logits are the same
with or without one, and leaving it out keeps SDPA on its fast causal path.

Packed: several examples share one row; each keeps its own shifted targets (no target ever
crosses into the next example), and position ids restart at 0 for each. With
`attention_mask=None`, transformers (masking_utils.find_packed_sequence_indices) turns
restarting position ids into a block-diagonal causal mask, so no token attends across
examples; tests check packed logits equal the examples run one by one. The forward must
pass use_cache=False: with a KV cache present transformers skips that detection.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exnihilo.train.data import Example, append_eos
from exnihilo.train.forward import IGNORE_INDEX


def with_eos(example: Example, eos_id: int) -> tuple[list[int], list[bool]]:
    """The example's tokens plus EOS (a trained token), unless it already ends in EOS or was
    truncated (a cut-off answer did not end, so it must not learn to stop there)."""
    ids = append_eos(example.input_ids, eos_id, example.complete)
    trained = list(example.trained) + [True] * (len(ids) - len(example.input_ids))
    return ids, trained


def shift_example(example: Example, eos_id: int, mask_prompt: bool
                  ) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: targets[t] = ids[t + 1], or -100 where masked."""
    ids, trained = with_eos(example, eos_id)
    inputs = ids[:-1]
    targets = [tok if (trained[t + 1] or not mask_prompt) else IGNORE_INDEX
               for t, tok in enumerate(ids[1:])]
    return inputs, targets


def shifted_length(example: Example, eos_id: int) -> int:
    """How many positions the example occupies in a batch row."""
    return len(with_eos(example, eos_id)[0]) - 1


def collate_padded(examples: Sequence[Example], pad_id: int, eos_id: int,
                   mask_prompt: bool) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest (ch07's custom_collate_fn)."""
    pairs = [shift_example(e, eos_id, mask_prompt) for e in examples]
    width = max(len(inputs) for inputs, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, targets) in enumerate(pairs):
        input_ids[row, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        labels[row, :len(targets)] = torch.tensor(targets, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, eos_id: int,
                   mask_prompt: bool) -> dict[str, torch.Tensor]:
    """Several examples per row; position ids restart per example (and for the pad tail).

    `example_index` numbers the batch's examples in row-major order (-1 on padding), so
    `forward.sequence_logprobs` gives each packed example its own sum."""
    packed = []
    n_seen = 0
    for row in rows:
        inputs: list[int] = []
        targets: list[int] = []
        positions: list[int] = []
        owners: list[int] = []
        for example in row:
            ex_inputs, ex_targets = shift_example(example, eos_id, mask_prompt)
            inputs += ex_inputs
            targets += ex_targets
            positions += list(range(len(ex_inputs)))
            owners += [n_seen] * len(ex_inputs)
            n_seen += 1
        packed.append((inputs, targets, positions, owners))
    width = max(len(inputs) for inputs, *_ in packed)
    input_ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packed), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(packed), width), dtype=torch.long)
    example_index = torch.full((len(packed), width), -1, dtype=torch.long)
    for r, (inputs, targets, positions, owners) in enumerate(packed):
        n = len(inputs)
        input_ids[r, :n] = torch.tensor(inputs, dtype=torch.long)
        labels[r, :n] = torch.tensor(targets, dtype=torch.long)
        position_ids[r, :n] = torch.tensor(positions, dtype=torch.long)
        position_ids[r, n:] = torch.arange(width - n)  # the pad tail is its own "example"
        example_index[r, :n] = torch.tensor(owners, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "example_index": example_index}


def collate_continuations(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
                          ) -> dict[str, torch.Tensor]:
    """(prompt ids, continuation ids) rows → a right-padded batch whose trained targets are
    exactly the continuation tokens: what perplexity and preference methods score. The
    caller applies `append_eos` to a continuation that should end."""
    width = max(len(p) + len(c) - 1 for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt, cont) in enumerate(rows):
        if not prompt or not cont:
            raise ValueError("each row needs at least one prompt and one continuation token")
        ids = list(prompt) + list(cont)
        input_ids[r, :len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        labels[r, len(prompt) - 1:len(ids) - 1] = torch.tensor(list(cont), dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing of example lengths into rows of `capacity`.

    Returns rows of example indices. Hand-written because it is ten lines; FFD uses at most
    11/9·OPT + 1 rows, which keeps padding to a few percent on instruction data.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"example {i} has {lengths[i]} positions > row capacity {capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@dataclass(frozen=True)
class BatchPlan:
    """How examples become micro-batches: fixed by (seed, epoch), so a resumed run replays
    exactly the same batches. Each batch is a list of rows; each row a list of indices."""

    batch_size: int
    pack: bool
    max_length: int
    seed: int

    def epoch(self, lengths: Sequence[int], epoch: int) -> list[list[list[int]]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if self.pack:
            rows_local = pack_rows([lengths[i] for i in order], self.max_length)
            rows = [[order[j] for j in row] for row in rows_local]
            rng.shuffle(rows)
        else:
            rows = [[i] for i in order]
        return [rows[k:k + self.batch_size] for k in range(0, len(rows), self.batch_size)]


def make_collate(pad_id: int, eos_id: int, mask_prompt: bool, pack: bool):
    """A function from a batch's rows of examples to tensors."""
    def collate(rows: Sequence[Sequence[Example]]) -> dict[str, torch.Tensor]:
        if pack:
            return collate_packed(rows, pad_id, eos_id, mask_prompt)
        return collate_padded([row[0] for row in rows], pad_id, eos_id, mask_prompt)
    return collate


def padding_waste(batches: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int]
                  ) -> tuple[int, int]:
    """(padded positions, total positions) of planned batches: each batch is as wide as its
    fullest row, and every position beyond a row's examples is padding."""
    total = pad = 0
    for batch in batches:
        used = [sum(lengths[i] for i in row) for row in batch]
        width = max(used)
        total += width * len(batch)
        pad += sum(width - u for u in used)
    return pad, total
