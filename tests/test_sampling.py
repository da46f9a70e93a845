"""The step sampler: a step is the same global batch however it is split across processes and accumulated
micro-batches, every process takes the same number of micro-batches, the step's target count travels with
each example, and a sampler started at any step continues exactly where an uninterrupted one would be."""

import itertools

import pytest

from moelab.data.sampling import StepBatches, StepExamples, supervised_targets

LENGTHS = [(7 * i) % 23 + 3 for i in range(101)]
TARGETS = [length // 2 for length in LENGTHS]


def steps(sampler: StepBatches, epochs: int = 2) -> list[list[list[tuple[int, int]]]]:
    """Per epoch, the micro-batches this process takes."""
    return [list(sampler) for _ in range(epochs)]


def global_steps(batch_size: int, processes: int, accumulate: int, group_by_length: bool = True):
    """Per epoch and step: the set of examples of the whole step (all processes, all micro-batches)."""
    per_rank = [steps(StepBatches(LENGTHS, TARGETS, batch_size, seed=3, num_processes=processes, rank=rank,
                                  accumulate=accumulate, group_by_length=group_by_length))
                for rank in range(processes)]
    result = []
    for epoch in range(2):
        counts = {len(per_rank[rank][epoch]) for rank in range(processes)}
        assert len(counts) == 1, "every process takes the same number of micro-batches"
        micro = [per_rank[rank][epoch] for rank in range(processes)]
        epoch_steps = []
        for step in range(len(micro[0]) // accumulate):
            examples = [pair for rank in range(processes)
                        for batch in micro[rank][step * accumulate:(step + 1) * accumulate] for pair in batch]
            assert all(batch for rank in range(processes)
                       for batch in micro[rank][step * accumulate:(step + 1) * accumulate]), "no empty micro-batch"
            indices = sorted(index for index, _ in examples)
            assert len(set(indices)) == len(indices), "no example twice in a step"
            assert {count for _, count in examples} == {sum(TARGETS[i] for i in indices)}, "the step's targets"
            epoch_steps.append(indices)
        result.append(epoch_steps)
    return result


@pytest.mark.parametrize("group_by_length", [True, False])
def test_a_step_is_the_same_global_batch_however_it_is_split(group_by_length):
    reference = global_steps(8, 1, 1, group_by_length)
    assert global_steps(4, 2, 1, group_by_length) == reference  # 2 processes × 4
    assert global_steps(4, 1, 2, group_by_length) == reference  # 1 process × 4, 2 accumulated
    assert global_steps(2, 2, 2, group_by_length) == reference  # both
    assert reference[0] != reference[1], "a new order each epoch"


def test_single_process_batches_cover_the_epoch_and_group_lengths():
    sampler = StepBatches(LENGTHS, TARGETS, 8, seed=0)
    epoch = list(sampler)
    indices = [index for batch in epoch for index, _ in batch]
    assert sorted(indices) == list(range(len(LENGTHS))), "one process, one micro-batch: nothing dropped"
    padded = sum(max(LENGTHS[i] for i, _ in batch) * len(batch) for batch in epoch)
    assert padded < 1.1 * sum(LENGTHS), "batches of similar lengths"
    assert [[i for i, _ in b] for b in StepBatches(LENGTHS, TARGETS, 8, seed=0)] == [[i for i, _ in b] for b in epoch]


def test_a_last_step_too_small_for_every_micro_batch_is_dropped():
    sampler = StepBatches([5] * 10, [1] * 10, 2, seed=0, num_processes=2, rank=0, accumulate=2)
    assert sampler.steps_per_epoch == 1 and len(list(sampler)) == 2  # 8 of 10; 2 left for 4 micro-batches
    assert StepBatches([5] * 12, [1] * 12, 2, seed=0, num_processes=2, rank=0, accumulate=2).steps_per_epoch == 2
    with pytest.raises(ValueError, match="cannot fill one step"):
        StepBatches([5] * 3, [1] * 3, 1, seed=0, num_processes=2, rank=1, accumulate=2)


@pytest.mark.parametrize("resume_step", [0, 3, 6, 7, 12])
def test_a_sampler_started_at_a_step_continues_the_uninterrupted_order(resume_step):
    def make():
        return StepBatches(LENGTHS, TARGETS, 4, seed=1, num_processes=2, rank=1, accumulate=2)

    uninterrupted = list(itertools.chain.from_iterable(steps(make(), epochs=3)))
    resumed = make()
    resumed.start_at(resume_step)
    continued = list(itertools.chain.from_iterable(steps(resumed, epochs=3)))
    per_epoch = make().steps_per_epoch
    assert per_epoch == 7  # 101 examples, steps of 16: 6 full and one of 5 (at least one per micro-batch)
    tail = uninterrupted[resume_step * 2:]
    assert continued[:len(tail)] == tail


def test_examples_carry_their_step_targets():
    assert supervised_targets([-100, -100, 5, 6, -100]) == 2, "the first label is never a target"
    item = StepExamples([{"input_ids": [1, 2], "labels": [1, 2], "task_id": 0}])[(0, 17)]
    assert item["step_targets"] == 17 and item["input_ids"] == [1, 2]
