"""The runtime-free core: what a node is and what it exchanges, shared by every method.

node      a node (one component and what trains with it), its inbox and its outbox
messages  typed messages (activation, gradient, embedding, synthesizer target) and `InFlight`
stored    stored forwards for late gradients: grad_mode stash | recompute, defined once
rule      the `Rule` a method subclasses (`ChainRule` for a backbone split into K components)
blocks    components, their optimizers and schedulers
weights   live, cloned and stashed weights; functional forwards; frozen BatchNorm statistics
memory    bytes held in flight
synth, dcasgd, mach_blocks, meters   gradient synthesizers, DC-ASGD, MACH's teachers and
          students, windowed metric means
Nothing here imports Lightning or a runtime.
"""
