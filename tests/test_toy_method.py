"""Adding a method is one file and one registration line: a toy rule, defined here, trains.

`LastOnly` trains only the last component on the loss; the others are fixed random features (no
gradient crosses any link). Its config section `last_only.loss_scale` is declared next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import mach_lightning.methods as methods
from mach_lightning.config import config_section, load_config
from mach_lightning.config import sections as config_sections
from mach_lightning.core.node import Inbox, Node, Outbox
from mach_lightning.core.rule import ChainRule
from mach_lightning.fit import run_fit
from mach_lightning.sim import create_topology

from .conftest import tiny_overrides
from .test_fit import column, read_metrics


@pytest.fixture
def toy_method():
    """Register the toy method and its section for one test, then restore both registries."""
    saved = dict(methods.TOPOLOGIES), dict(config_sections.SECTIONS)

    @config_section("last_only")
    @dataclass
    class LastOnlyConfig:
        loss_scale: float = 1.0  # multiplies the last component's loss

    @methods.register_topology(section=LastOnlyConfig)
    class LastOnly(ChainRule):
        name = "last_only"

        def node_step(self, node: Node, inbox: Inbox) -> Outbox:
            out = Outbox(node.index)
            h = node.component(inbox.x if node.index == 0 else inbox.one("activation"))
            if not self.is_last(node):
                out.send(node.index + 1, h.detach(), inbox.batch)  # nothing flows back
                return out
            out.logits, out.applied = h, [inbox.batch]
            out.add_loss(self.cfg.last_only.loss_scale * F.cross_entropy(h, inbox.y))
            return out

    yield LastOnly
    for registry, before in zip((methods.TOPOLOGIES, config_sections.SECTIONS), saved):
        registry.clear()
        registry.update(before)


def test_a_toy_rule_registered_here_trains_two_steps(toy_method, tmp_path):
    overrides = [
        "topology.name=last_only",
        "last_only.loss_scale=2.0",
        "model.num_components=3",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.test_after_fit=false",
    ]
    cfg = load_config(None, tiny_overrides(tmp_path, *overrides))
    torch.manual_seed(cfg.seed)
    initial = create_topology(cfg, (1, 8, 8), 10).components.state_dict()
    result = run_fit(cfg)
    losses = column(read_metrics(result["run_dir"]), "train/loss")
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    run_dir = Path(result["run_dir"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["last_only"] == {"loss_scale": 2.0}
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    weights = trained["state_dict"]
    for key, before in initial.items():
        after = weights[f"components.{key}"]
        moved = not torch.equal(before, after)
        assert moved == key.startswith("2."), key  # only the last component learnt


def test_the_toy_section_is_unknown_once_the_method_is_gone(tmp_path):
    with pytest.raises(Exception, match="last_only"):
        load_config(None, tiny_overrides(tmp_path, "last_only.loss_scale=2.0"))
