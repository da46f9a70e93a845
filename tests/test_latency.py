"""Inference latency per run: the timing steps decode with the KV cache, and measuring touches neither the
run's random streams nor the model's mode."""

import torch
from conftest import tiny_model

from moelab.modules.latency import decode_step, measure_latency


class CountingModel(torch.nn.Module):
    """Counts forwards and how many tokens each one is given."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config, self.inputs = model, model.config, []

    def forward(self, input_ids, **kwargs):
        self.inputs.append(input_ids.shape[1])
        return self.model(input_ids=input_ids, **kwargs)


def test_decoding_reads_one_new_token_per_step_from_the_cache():
    model = CountingModel(tiny_model()[0].eval())
    seconds_per_token = decode_step(model, torch.tensor([[5, 6, 7, 8]]), 3, torch.device("cpu"))()
    assert model.inputs == [4, 1, 1, 1], "the prompt once, then each generated token alone"
    assert seconds_per_token > 0


def test_measuring_latency_leaves_the_random_streams_and_the_mode_alone():
    model = tiny_model()[0].train()
    state = torch.random.get_rng_state()
    latency = measure_latency(model, torch.device("cpu"), prompt_tokens=8, new_tokens=2, repeats=2)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert latency["prefill_ms"] > 0 and latency["decode_ms_per_token"] > 0
    assert (latency["prompt_tokens"], latency["new_tokens"], latency["repeats"]) == (8, 2, 2)
