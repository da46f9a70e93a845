"""Expert activation maps: exact regrouping per layer, figure layout, PNG files, the W&B callback."""

from types import SimpleNamespace

import matplotlib.image
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from moelab.adapters.routing import Routing, RoutingStatistics
from moelab.modules.callbacks import ExpertMapLogger
from moelab.modules.plots import (
    DPI,
    by_layer,
    comparison_figure,
    expert_map_figure,
    layer_of,
    panel_size,
    short_names,
    tasks_without_data,
    write_expert_maps,
)

SITES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp", "model.layers.1.mlp"]
TASKS = ["alpha", "beta", "gamma"]


def routed_stats(num_experts: int = 4, tasks: int = 3) -> RoutingStatistics:
    """Hand-made routing, top-1: site i sends every token to expert i; each task has 2 tokens, and the first
    site gives expert 0 probability 0.7 (the rest uniform)."""
    stats = RoutingStatistics(tasks)
    token_tasks = torch.arange(2 * tasks) % tasks
    records = []
    for index, site in enumerate(SITES):
        probs = torch.full((2 * tasks, num_experts), 0.3 / (num_experts - 1) if index == 0 else 1.0 / num_experts)
        if index == 0:
            probs[:, 0] = 0.7
        records.append((site, Routing(probs, torch.full((2 * tasks, 1), index))))
    stats.update(records, torch.ones(2 * tasks, dtype=torch.bool), token_tasks)
    return stats


def test_sites_group_by_decoder_layer_and_rows_get_short_names():
    assert [layer_of(site) for site in SITES] == ["model.layers.0", "model.layers.0", "model.layers.1"]
    assert layer_of("router") == "router"
    assert short_names(SITES) == ["0.self_attn.q_proj", "0.mlp", "1.mlp"]
    assert short_names(["model.layers.1", "model.layers.10"]) == ["1", "10"]


def test_layer_maps_are_exact_over_the_layers_tokens():
    layers = by_layer(routed_stats())
    assert layers.sites == ["model.layers.0", "model.layers.1"]
    load = layers.activation("load")
    # layer 0 pools two sites: half of its slots went to expert 0, half to expert 1, in every task
    assert torch.allclose(load[0], torch.tensor([0.5, 0.5, 0.0, 0.0])[:, None].expand(4, 3).double())
    assert torch.allclose(load[1, 2], torch.ones(3, dtype=torch.float64))
    importance = layers.activation("importance")
    assert importance[0, 0, 0].item() == pytest.approx((0.7 + 0.25) / 2)
    pooled = by_layer(routed_stats(), pool_tasks=True)
    assert pooled.num_tasks == 1 and torch.allclose(pooled.activation("load")[..., 0], load[..., 0])


def heatmaps(figure) -> list:
    return [axis for axis in figure.axes if axis.images]


def test_a_figure_has_a_panel_per_task_and_a_difference_row():
    figure = expert_map_figure(routed_stats(), TASKS, "mixlora [official-code-parity]", "load", "train")
    panels = heatmaps(figure)
    assert len(panels) == 2 * len(TASKS)
    assert [panel.get_title() for panel in panels[:3]] == TASKS
    assert panels[3].get_title() == "alpha − mean of tasks"
    assert "mixlora [official-code-parity]" in figure.get_suptitle()
    assert panels[0].get_images()[0].get_array().shape == (2, 4), "layer × expert"
    per_site = expert_map_figure(routed_stats(), TASKS, "x", "importance", "train", per_site=True)
    assert heatmaps(per_site)[0].get_images()[0].get_array().shape == (3, 4), "site × expert"
    single = expert_map_figure(routed_stats(tasks=1), ["alpha"], "x", "load", "dev")
    assert len(heatmaps(single)) == 1, "one task: nothing to difference"


def stats_missing_beta() -> RoutingStatistics:
    """Three tasks, top-1 at every site: alpha's 2 tokens go to expert 0, gamma's 2 to expert 1, beta has none
    (a dev pass cut short before it reached beta)."""
    stats = RoutingStatistics(3)
    probs = torch.full((4, 4), 0.25)
    selected = torch.tensor([[0], [0], [1], [1]])
    stats.update([(site, Routing(probs, selected)) for site in SITES], torch.ones(4, dtype=torch.bool),
                 torch.tensor([0, 0, 2, 2]))
    return stats


def test_a_task_without_tokens_is_drawn_as_no_data_not_as_zero_load():
    stats = stats_missing_beta()
    assert tasks_without_data(stats, TASKS) == ["beta"]
    assert tasks_without_data(RoutingStatistics(3), TASKS) == [], "a method that does not route lacks nothing"
    figure = expert_map_figure(stats, TASKS, "x", "load", "dev")
    panels = heatmaps(figure)
    assert [panel.get_title() for panel in panels] == ["alpha", "gamma", "alpha − mean of tasks",
                                                       "gamma − mean of tasks"]
    no_data = [axis for axis in figure.axes if any("no data" in text.get_text() for text in axis.texts)]
    assert [axis.get_title() for axis in no_data] == ["beta", "beta"] and not any(axis.images for axis in no_data)
    # the mean of tasks is over alpha and gamma only: alpha's layer-1 deviation is +0.5 on expert 0, not +2/3
    alpha_deviation = panels[2].get_images()[0].get_array()
    assert alpha_deviation[1].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    empty = RoutingStatistics.from_state_dict({**stats.state_dict(), "num_tasks": 3})
    empty.sums["tokens"].zero_()
    with pytest.raises(ValueError, match="no tokens of any task"):
        expert_map_figure(empty, TASKS, "x", "load", "dev")


def save_routing(folder, stats: RoutingStatistics, label="mixlora [official-code-parity]", tasks=TASKS):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"tasks": tasks, "method": label, "train": stats.state_dict(), "dev": stats.state_dict()},
               folder / "routing.pt")
    return folder


def test_pngs_are_written_per_kind_with_the_figure_size(tmp_path):
    run = save_routing(tmp_path / "run", routed_stats())
    paths = write_expert_maps(run)
    assert [p.name for p in paths] == ["expert_map_load_dev.png", "expert_map_importance_dev.png"]
    width, height = panel_size(2, 4)
    image = matplotlib.image.imread(paths[0])
    assert image.shape[:2] == (round(2 * height * DPI), round(len(TASKS) * width * DPI))
    per_site = write_expert_maps(run, tmp_path / "out", split="train", per_site=True)
    assert per_site[0] == tmp_path / "out" / "expert_map_load_train_per_site.png"
    width, height = panel_size(len(SITES), 4)
    assert matplotlib.image.imread(per_site[0]).shape[:2] == (round(2 * height * DPI), round(3 * width * DPI))


def test_a_method_that_does_not_route_gets_no_maps(tmp_path):
    run = save_routing(tmp_path / "lora", RoutingStatistics(3), label="lora [official-code-parity]")
    assert write_expert_maps(run) == []
    with pytest.raises(ValueError, match="does not route"):
        expert_map_figure(RoutingStatistics(3), TASKS, "lora", "load", "train")
    with pytest.raises(FileNotFoundError, match="routing.pt"):
        write_expert_maps(tmp_path / "nowhere")


def test_the_comparison_figure_pools_seeds_and_skips_methods_without_routing():
    figure = comparison_figure([("mixlora", [routed_stats(), routed_stats()]), ("lora", [RoutingStatistics(3)]),
                                ("furina", [routed_stats(num_experts=7)])], "dev")
    panels = heatmaps(figure)
    assert len(panels) == 4, "two routed methods × load, importance"
    assert panels[1].get_images()[0].get_array().shape == (2, 7)
    assert comparison_figure([("lora", [RoutingStatistics(3)])], "dev") is None


# -- the W&B callback ----------------------------------------------------------------------------------


class SpyWandbLogger(WandbLogger):
    """A WandbLogger that records what it is asked to log instead of starting a W&B run."""

    def __init__(self) -> None:
        super().__init__(offline=True)
        self.logged = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((metrics, step))


def fit_end(callback, loggers, stats):
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True, global_step=7,
                              datamodule=SimpleNamespace(task_names=TASKS))
    module = SimpleNamespace(routing={"train": stats}, adapter=SimpleNamespace(label="mixlora [official-code-parity]"))
    callback.on_fit_end(trainer, module)


def test_the_callback_logs_one_wandb_image_per_kind(tmp_path):
    import wandb

    spy = SpyWandbLogger()
    fit_end(ExpertMapLogger(), [CSVLogger(tmp_path), spy], routed_stats())
    assert len(spy.logged) == 1
    metrics, step = spy.logged[0]
    assert step == 7 and set(metrics) == {"routing/expert_map_load", "routing/expert_map_importance"}
    assert all(isinstance(image, wandb.Image) for image in metrics.values())


def test_the_callback_stays_silent_without_wandb_or_routing(tmp_path):
    spy = SpyWandbLogger()
    fit_end(ExpertMapLogger(), [spy], RoutingStatistics(3))
    assert spy.logged == [], "a method that does not route"
    fit_end(ExpertMapLogger(), [CSVLogger(tmp_path)], routed_stats())  # no W&B logger: nothing to call
