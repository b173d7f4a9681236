"""A MACH rule's wiring outside training: evaluation, export's full chain, simulated-time work.

`wired` runs the nodes as training does (methods/mach_base.py), without losses, cut edges or
stored forwards: what `main` (node 0 as trained) and `chain_logits` (a node fed by its real
neighbours, the chain its student replaces) evaluate.
"""

from __future__ import annotations

import torch


def wiring(mode: str, neighbour, imitation) -> list:
    """The teacher inputs of a node's training wirings: its neighbours', its student's, or both."""
    both = [neighbour, imitation]
    return both[:1] if mode == "neighbour" else both[1:] if mode == "student" else both


def wired(rule, x: torch.Tensor, modes: list[str], nodes: set[int]) -> dict[int, torch.Tensor]:
    """The logits of each of `nodes` through its (first) training wiring, nothing cut."""
    graph = rule.graph
    imitations = {
        i: rule.imitate(i, x) if graph.standalone or modes[i] != "neighbour" else None
        for i in nodes
    }
    own = {j: rule.embed(j, x, imitations[j]) for j in sorted(nodes)} if graph.standalone else {}
    shared, logits = dict(own), {}
    for i in [i for i in graph.order if i in nodes]:
        nbrs = rule.neighbours(i)
        neighbour = torch.cat([shared[j] for j in nbrs], dim=1) if nbrs else None
        mode = modes[i] if neighbour is not None else "neighbour"
        inp = wiring(mode, neighbour, imitations[i])[0]
        use_own = inp is imitations[i] and own.get(i) is not None  # kgraph: the student-wired one
        embedding = own[i] if use_own else rule.embed(i, x, inp)
        logits[i] = rule.classify(i, embedding)
        if not graph.standalone:
            shared[i] = embedding
    return logits


def node_work(rule, x: torch.Tensor) -> list[tuple]:
    """Per node, (forward, parameters, message bytes) of its own work for simulated time.

    A node's teacher, head and student run with a dummy neighbour input, as on a device of its
    own; its message is its published embedding.
    """
    works = []
    for i in range(rule.num_nodes()):
        width = sum(rule.embedding_width(j) for j in rule.neighbours(i))
        neighbour = x.new_zeros(x.shape[0], width) if width else None

        def forward(i=i, neighbour=neighbour) -> list[torch.Tensor]:
            imitation = rule.imitate(i, x)
            logits = rule.classify(i, rule.embed(i, x, neighbour))
            return [logits] if imitation is None else [logits, imitation]

        params = [p for m in rule.node_modules(i) for p in m.parameters() if p.requires_grad]
        works.append((forward, params, x.shape[0] * rule.embedding_width(i) * x.element_size()))
    return works
